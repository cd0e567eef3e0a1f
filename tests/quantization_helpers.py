"""Hand-written baselines and Qwix/AQT set-ups for the quantization tests.

Each baseline is the FFN a user writes with ``nnx.Linear`` / ``nn.Dense``;
the tests copy a flaxact layer's weights into it and require the same
numbers under each quantization flow. The hand-written layers use
``flaxact.silu``/``flaxact.gelu`` so that, in float32, the two compute the
identical forward pass and any difference is the flow's, not rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import qwix
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from flax import nnx

import flaxact

ACT = {'silu': flaxact.silu, 'gelu': flaxact.gelu}

#: Qwix QAT: int8 weights and activations.
QAT_RULES = [
  qwix.QtRule(module_path='.*', weight_qtype='int8', act_qtype='int8')
]
#: Qwix QAT with static activation scales (calibration statistics).
QAT_STATIC_RULES = [
  qwix.QtRule(
    module_path='.*',
    weight_qtype='int8',
    act_qtype='int8',
    act_static_scale=True,
  )
]
#: Qwix PTQ: int8 weights.
PTQ_RULES = [qwix.QuantizationRule(module_path='.*', weight_qtype='int8')]
#: Qwix LoRA, rank 4.
LORA_RULES = [qwix.LoraRule(module_path='.*', rank=4, alpha=0.5)]


class NnxHand(nnx.Module):
  """``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` with nnx.Linear."""

  def __init__(self, d, h, *, gated, act, use_bias, rngs):
    self.gated, self.act = gated, ACT[act]
    kw = dict(use_bias=use_bias, rngs=rngs)
    self.gate_proj = nnx.Linear(d, h, **kw) if gated else nnx.data(None)
    self.up_proj = nnx.Linear(d, h, **kw)
    self.down_proj = nnx.Linear(h, d, **kw)

  def __call__(self, x):
    # gate first, as flaxact: LoRA weights are drawn in call order.
    g = self.gate_proj(x) if self.gated else None
    u = self.up_proj(x)
    h = self.act(u) if g is None else self.act(g) * u
    return self.down_proj(h)


def nnx_hand_like(layer, *, gated, act, use_bias):
  """An :class:`NnxHand` holding ``layer``'s weights."""
  d, h = layer.in_features, layer.hidden_features
  hand = NnxHand(
    d, h, gated=gated, act=act, use_bias=use_bias, rngs=nnx.Rngs(9)
  )
  names = ('gate_proj', 'up_proj', 'down_proj') if gated else ('up_proj',)
  for name in (*names, 'down_proj'):
    src, dst = getattr(layer, name), getattr(hand, name)
    dst.kernel[...] = src.kernel[...]
    if use_bias:
      dst.bias[...] = src.bias[...]
  return hand


class LinenHand(nn.Module):
  """The Linen baseline, with ``nn.Dense(dot_general_cls=...)``."""

  hidden: int
  gated: bool = True
  act: str = 'silu'
  use_bias: bool = False
  dot_general_cls: object = None

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, dot_general_cls=self.dot_general_cls)
    if self.gated:
      g = nn.Dense(self.hidden, name='gate_proj', **kw)(x)
      u = nn.Dense(self.hidden, name='up_proj', **kw)(x)
      h = ACT[self.act](g) * u
    else:
      h = ACT[self.act](nn.Dense(self.hidden, name='up_proj', **kw)(x))
    return nn.Dense(x.shape[-1], name='down_proj', **kw)(h)


def aqt_dot_general_cls(mode):
  """``functools.partial(AqtDotGeneral, cfg)``: int8 forward, float grads."""
  cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  return functools.partial(
    aqt_flax.AqtDotGeneral,
    cfg,
    rhs_quant_mode=mode,
    rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
    prng_name=None,
  )


def param_leaves(
  tree, keys=('kernel', 'bias', 'kernel_lora_a', 'kernel_lora_b')
):
  """``{(projection, name): leaf}`` of a params tree (pure dict)."""
  out = {}
  for proj, sub in tree.items():
    if isinstance(sub, dict):
      for k, v in sub.items():
        if k in keys and v is not None and hasattr(v, 'shape'):
          out[(proj, k)] = v
  return out


def unfuse(tree):
  """Splits a ``gate_up_proj`` entry (kernel ``(in, 2, h)``) into two."""
  tree = dict(tree)
  fused = tree.pop('gate_up_proj', None)
  if fused:
    for i, name in enumerate(('gate_proj', 'up_proj')):
      tree[name] = {
        k: v[..., i, :] for k, v in fused.items() if hasattr(v, 'shape')
      }
  return tree


def float_error(y, ref):
  """Max absolute error of ``y`` relative to the max of ``|ref|``."""
  return float(jax.numpy.max(abs(y - ref)) / jax.numpy.max(abs(ref)))
