"""The Flax Linen gated FFN: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

Kernels are stored ``(in_features, out_features)`` and annotated with logical
axis names (``nn.with_logical_partitioning``), so parameters come back boxed;
``nn.unbox`` returns plain arrays. The options shared by every layer are
documented on :class:`flaxact._src.linen.base.FFNBase`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact import linen as fl
  >>> layer = fl.SwiGLU(hidden_features=64)
  >>> x = jnp.ones((2, 16))
  >>> variables = layer.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, nn.unbox(variables))
  {'params': {'down_proj': {'kernel': (64, 16)},
              'gate_proj': {'kernel': (16, 64)},
              'up_proj': {'kernel': (16, 64)}}}
  >>> layer.apply(variables, x).shape
  (2, 16)
  >>> layer
  SwiGLU(hidden_features=64, out_features=None, activation='silu', ...)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax

from flaxact._src.layers import ffn_body, projection, remat, sharding
from flaxact._src.layers.ffn_body import Activation
from flaxact._src.linen.base import FFNBase

Array = jax.Array


class GatedFFN(FFNBase):
  r"""A gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

  .. math::
    y = \left(\mathrm{act}(x W_g + b_g) \odot (x W_u + b_u)\right) W_d + b_d

  The layer of LLaMA, Mistral, Qwen, T5.1.1 and Gemma. Parameters:
  ``gate_proj``, ``up_proj`` (kernels ``(in, hidden)``) and ``down_proj``
  (``(hidden, out)``), or with ``fused_gate_up`` a single ``gate_up_proj``
  kernel ``(in, 2, hidden)`` that computes the same numbers in one matmul.
  **No biases by default** (LLaMA, Gemma, Mistral have none). Every other
  option (``use_bias``, dropout, ``dtype``, ``param_dtype``, ``precision``,
  initialisers, ``dot_general``, ``dot_general_cls``,
  ``activations_in_float32``, ``remat``) is an option every flaxact Linen
  layer shares (the attributes of its base class, ``FFNBase``, listed
  with this layer's own in the API reference).

  The backward pass keeps two hidden-sized arrays (the gate and up
  pre-activations) with ``remat=True``; the hidden activation is recomputed.

  Attributes:
    hidden_features: the hidden width (``'mlp'``); see
      :func:`flaxact.ffn_hidden_features`.
    out_features: the output width; ``None`` (default) uses the input's.
    activation: the element-wise activation of the gate: a registry name
      (see :func:`flaxact.get_activation`), a function, or a learnable
      activation module (:class:`PReLU`, :class:`Swish`), whose parameters
      then live in this layer under ``'activation'``.
    fused_gate_up: one fused ``gate_up_proj`` projection instead of
      ``gate_proj`` and ``up_proj``: the same function given the same
      weights, though one fused matmul may round differently from two
      (equal within float tolerance, not bit for bit).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.GatedFFN(64, activation='gelu_tanh')  # Gemma's FFN
    >>> x = jnp.ones((2, 5, 16), jnp.bfloat16)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).dtype
    dtype(bfloat16)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202

  See also:
    :class:`SwiGLU`, :class:`GeGLU`, :class:`ReGLU`, :class:`FFN`.
  """

  hidden_features: int
  out_features: int | None = None
  _: dataclasses.KW_ONLY
  activation: Activation = 'silu'
  fused_gate_up: bool = False

  remat_names: ClassVar[tuple[str, ...]] = remat.GATED_NAMES

  def __post_init__(self):
    self.validate_options(
      self.activation,
      hidden_features=self.hidden_features,
      out_features=self.out_features,
    )
    super().__post_init__()

  @nn.compact
  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype = projection.layer_dtype(x, self.dtype)
    hidden_dtype = projection.hidden_projection_dtype(
      dtype, self.activations_in_float32
    )
    hidden = self.hidden_features
    if self.fused_gate_up:
      gate_up_proj = self.projection(
        'gate_up_proj',
        (2, hidden),
        sharding.FUSED_PROJ_AXES,
        dtype,
        hidden_dtype,
      )

      def gate_up(x):
        return projection.split_fused(gate_up_proj(x))
    else:
      gate_proj = self.projection(
        'gate_proj', (hidden,), sharding.IN_PROJ_AXES, dtype, hidden_dtype
      )
      up_proj = self.projection(
        'up_proj', (hidden,), sharding.IN_PROJ_AXES, dtype, hidden_dtype
      )

      def gate_up(x):
        return gate_proj(x), up_proj(x)

    out = self.out_features or x.shape[-1]
    down_proj = self.projection(
      'down_proj', (out,), sharding.OUT_PROJ_AXES, dtype
    )
    return ffn_body.gated_body(
      x,
      gate_up=gate_up,
      down=down_proj,
      activation=ffn_body.resolve_activation(
        self.activation, type(self).__name__
      ),
      parametric=isinstance(self.activation, nn.Module),
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )
