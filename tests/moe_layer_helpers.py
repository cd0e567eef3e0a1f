"""Shared by the MoE layer tests: the cases, weights and a float64 reference.

:data:`CASES` is the registry the generic layer suite runs over: adding a
configuration is one line. Every case builds the NNX layer, whose weights
(``nnx.Param``) and ``score_correction_bias`` are then handed to the Linen
layer and to the float64 per-token reference of ``tests/moe_reference.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from tests import moe_reference

T, D, H, E, K = 12, 8, 16, 4, 2
SHARED_H = 12
_GPT_OSS = functools.partial(flaxact.gpt_oss_glu, alpha=1.702, limit=7.0)

# name: MoE keyword arguments (E and k included)
CASES: dict[str, dict] = {
  'softmax': dict(num_experts=E, experts_per_token=K),
  'softmax_unnormalised': dict(
    num_experts=E, experts_per_token=K, normalize_weights=False
  ),
  'sigmoid_scaled': dict(
    num_experts=E,
    experts_per_token=K,
    router='sigmoid',
    routed_scaling_factor=2.5,
  ),
  'sigmoid_groups': dict(
    num_experts=8,
    experts_per_token=3,
    router='sigmoid',
    num_groups=4,
    groups_per_token=2,
  ),
  'shared': dict(
    num_experts=E, experts_per_token=K, shared_hidden_features=SHARED_H
  ),
  'shared_gate': dict(
    num_experts=E,
    experts_per_token=1,
    shared_hidden_features=SHARED_H,
    shared_expert_gate=True,
  ),
  'capacity': dict(num_experts=E, experts_per_token=K, capacity_factor=0.5),
  'gpt_oss': dict(
    num_experts=E,
    experts_per_token=K,
    gated_product=_GPT_OSS,
    use_bias=True,
    router_use_bias=True,
  ),
}


def x_input(dtype=jnp.float32, t: int = T) -> jax.Array:
  return jax.random.normal(jax.random.key(1), (t, D), dtype)


def nnx_layer(case: str, **overrides) -> fx.MoE:
  """The NNX layer of ``case``, random biases and correction bias set.

  Built under ``nnx.jit``: one compilation instead of one per operation.
  """
  return nnx.jit(functools.partial(_nnx_layer, case, **overrides))()


def _nnx_layer(case: str, **overrides) -> fx.MoE:
  kw = {**CASES[case], **overrides}
  layer = fx.MoE(
    D,
    H,
    kw.pop('num_experts'),
    kw.pop('experts_per_token'),
    bias_init=jax.nn.initializers.normal(0.5),
    kernel_init=jax.nn.initializers.normal(0.5),
    rngs=nnx.Rngs(0),
    **kw,
  )
  if layer.score_correction_bias is not None:
    e = layer.num_experts
    layer.score_correction_bias[...] = jnp.linspace(-0.3, 0.3, e)[::-1]
  return layer


def linen_layer(case: str, **overrides) -> fl.MoE:
  kw = {**CASES[case], **overrides}
  return fl.MoE(H, kw.pop('num_experts'), kw.pop('experts_per_token'), **kw)


def variables_of(layer: fx.MoE) -> dict:
  """The NNX layer's weights as Linen variables."""
  out = {'params': nnx.to_pure_dict(nnx.state(layer, nnx.Param))}
  if layer.score_correction_bias is not None:
    bias = layer.score_correction_bias[...]
    out['batch_stats'] = {'score_correction_bias': bias}
  return out


def reference(case: str, variables: dict, x) -> np.ndarray:
  """The float64 per-token output of ``case`` with ``variables``."""
  return reference_of(CASES[case], variables, x)


def reference_of(kw: dict, variables: dict, x) -> np.ndarray:
  """The float64 per-token output of ``MoE(**kw)`` with ``variables``.

  ``x`` is ``(T, d)``; ``kw`` holds ``experts_per_token`` and the options.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  route = dict(
    router=kw.get('router', 'softmax'),
    normalize=kw.get('normalize_weights', True),
    scale=kw.get('routed_scaling_factor', 1.0),
    num_groups=kw.get('num_groups'),
    groups_per_token=kw.get('groups_per_token'),
  )
  stats = variables.get('batch_stats')
  if stats is not None:
    route['bias'] = np.asarray(stats['score_correction_bias'], np.float64)
  biases = (None, None, None)
  if kw.get('use_bias'):
    biases = tuple(p[n]['bias'] for n in ('gate_proj', 'up_proj', 'down_proj'))
  x = np.asarray(x, np.float64)
  y, _, _ = moe_reference.moe(
    x,
    p['router']['kernel'],
    p['gate_proj']['kernel'],
    p['up_proj']['kernel'],
    p['down_proj']['kernel'],
    kw['experts_per_token'],
    router_bias=p['router'].get('bias'),
    biases=biases,
    product=moe_reference.gpt_oss_glu if kw.get('gated_product') else None,
    capacity_factor=kw.get('capacity_factor'),
    **route,
  )
  if 'shared_expert' in p:
    s = p['shared_expert']
    proj = lambda v, n: v @ s[n]['kernel'] + s[n].get('bias', 0.0)
    hidden = moe_reference.silu(proj(x, 'gate_proj')) * proj(x, 'up_proj')
    shared = proj(hidden, 'down_proj')
    if 'shared_expert_gate' in p:
      gate = x @ p['shared_expert_gate']['kernel']
      shared = shared / (1 + np.exp(-gate))
    y = y + shared
  return y
