"""The character-level transformer and the FFN variants under test.

A pre-LayerNorm decoder-only transformer with learned positions whose FFN is
one of the variants of Shazeer (2020), "GLU Variants Improve Transformer",
built from ``flaxact.nnx.FFN`` and ``flaxact.nnx.GatedFFN``. Every parameter
carries logical axis names (MaxText / T5X convention: ``embed``, ``mlp``,
``heads``, ``vocab``), so a mesh and a rule set are all a sharded run adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _cli import option
from flax import nnx

import flaxact
from flaxact import nnx as fnnx

#: The FFN variants of Shazeer (2020), in the paper's table order:
#: name -> (gated, activation).
VARIANTS: dict[str, tuple[bool, Callable[[jax.Array], jax.Array]]] = {
  'relu': (False, flaxact.relu),
  'gelu': (False, flaxact.gelu),
  'swish': (False, flaxact.silu),
  'glu': (True, flaxact.sigmoid),
  'bilinear': (True, flaxact.identity),
  'reglu': (True, flaxact.relu),
  'geglu': (True, flaxact.gelu),
  'swiglu': (True, flaxact.silu),
}

#: Display names, as in the paper's table.
DISPLAY = {
  'relu': 'FFN_ReLU',
  'gelu': 'FFN_GELU',
  'swish': 'FFN_Swish',
  'glu': 'FFN_GLU',
  'bilinear': 'FFN_Bilinear',
  'reglu': 'FFN_ReGLU',
  'geglu': 'FFN_GEGLU',
  'swiglu': 'FFN_SwiGLU',
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the transformer (each option is also a command-line flag)."""

  vocab_size: int  # from the corpus, not a flag
  d_model: int = option(128, 'model width')
  layers: int = option(2, 'transformer blocks')
  heads: int = option(4, 'attention heads')
  seq_len: int = option(64, 'context length in characters')


def hidden_features(d_model: int, gated: bool) -> int:
  """FFN width: ``4 * d_model``, times 2/3 when gated (rounded up to 8)."""
  return flaxact.ffn_hidden_features(d_model, gated=gated, multiple_of=8)


#: Builds one block's FFN from ``(d_model, rngs)``; replaces ``make_ffn``.
FFNFactory = Callable[[int, nnx.Rngs], nnx.Module]


def _names(*names: str | None) -> dict[str, Any]:
  return {'out_sharding': names}


def make_ffn(variant: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The FFN of ``variant`` (a key of ``VARIANTS``), without biases.

  ``remat=False``: these models are small, so the memory-lean backward
  (flaxact's default) buys nothing here and its recomputation costs time.
  """
  gated, act = VARIANTS[variant]
  layer = fnnx.GatedFFN if gated else fnnx.FFN
  return layer(
    d_model,
    hidden_features(d_model, gated),
    activation=act,
    use_bias=False,
    remat=False,
    rngs=rngs,
  )


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention."""

  def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads

    def proj(names):
      return nnx.Linear(
        d_model,
        d_model,
        use_bias=False,
        kernel_metadata=_names(*names),
        rngs=rngs,
      )

    self.query = proj(('embed', 'heads'))
    self.key = proj(('embed', 'heads'))
    self.value = proj(('embed', 'heads'))
    self.out = proj(('heads', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends over ``x`` of shape ``(batch, time, d_model)``."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    y = jax.nn.dot_product_attention(
      split(self.query(x)),
      split(self.key(x)),
      split(self.value(x)),
      is_causal=True,
    )
    return self.out(y.reshape(b, t, d))


def _layer_norm(d_model: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    d_model,
    scale_metadata=_names('embed'),
    bias_metadata=_names('embed'),
    rngs=rngs,
  )


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: attention, then the FFN under test.

  ``ffn``, when given, builds the FFN instead of ``make_ffn(variant)`` (the
  mixture-of-experts example passes one that returns a ``flaxact.nnx.MoE``).
  """

  def __init__(
    self,
    cfg: ModelConfig,
    variant: str,
    *,
    rngs: nnx.Rngs,
    ffn: FFNFactory | None = None,
  ):
    self.norm1 = _layer_norm(cfg.d_model, rngs)
    self.attn = CausalSelfAttention(cfg.d_model, cfg.heads, rngs=rngs)
    self.norm2 = _layer_norm(cfg.d_model, rngs)
    if ffn is None:
      self.ffn = make_ffn(variant, cfg.d_model, rngs=rngs)
    else:
      self.ffn = ffn(cfg.d_model, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``(batch, time, d_model)`` to the same shape."""
    x = x + self.attn(self.norm1(x))
    return x + self.ffn(self.norm2(x))


class CharLM(nnx.Module):
  """Decoder-only transformer over characters, learned positions."""

  def __init__(
    self,
    cfg: ModelConfig,
    variant: str,
    *,
    rngs: nnx.Rngs,
    ffn: FFNFactory | None = None,
  ):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=init,
      embedding_metadata=_names('vocab', 'embed'),
      rngs=rngs,
    )
    self.pos = nnx.Embed(
      cfg.seq_len,
      cfg.d_model,
      embedding_init=init,
      embedding_metadata=_names(None, 'embed'),
      rngs=rngs,
    )
    self.blocks = nnx.List(
      [Block(cfg, variant, rngs=rngs, ffn=ffn) for _ in range(cfg.layers)]
    )
    self.norm = _layer_norm(cfg.d_model, rngs)
    self.head = nnx.Linear(
      cfg.d_model,
      cfg.vocab_size,
      use_bias=False,
      kernel_metadata=_names('embed', 'vocab'),
      rngs=rngs,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, vocab)`` for ids ``(batch, time)``."""
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))[None]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def build_model(
  cfg: ModelConfig,
  variant: str,
  seed: int,
  *,
  ffn: FFNFactory | None = None,
) -> CharLM:
  """The model with initial weights from ``seed``; no mesh needed.

  ``ffn``: see ``Block``; ``None`` builds ``make_ffn(variant)``.
  """
  with nnx.use_eager_sharding(False):
    return CharLM(cfg, variant, rngs=nnx.Rngs(seed), ffn=ffn)


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
