"""MoE layers on 8 simulated CPU devices: expert parallelism and TP inside.

Run by ``tests/layers/test_moe_layers_sharding.py`` as one subprocess started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one JSON
object with, per case, the experts-axis shard of every expert kernel, how far
the sharded output and gradients are from the single-device layer's (an allclose
ratio: at most 1 passes), and the collectives in the compiled forward.

Cases:

- ``nnx_ep``, ``linen_ep``: mesh ``data=2, expert=4``,
  ``EXPERT_PARALLEL_RULES``.
- ``nnx_ep_dense``: as ``nnx_ep`` with ``impl='dense'`` (what quantizers
  get): no ``shard_map``, ``jit`` partitions the stacked-kernel matmuls.
- ``nnx_ep_tp``: mesh ``expert=4, model=2``, rules with ``'exp'`` on
  ``'expert'`` and ``'mlp'`` on ``'model'`` (tensor parallelism inside the
  experts and the shared expert).
"""

from __future__ import annotations

import json
import re
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.multidevice import auto_mesh, require_devices

T, D, H, E, K = 16, 8, 16, 8, 2
TOL = dict(rtol=1e-5, atol=1e-5)  # all-to-all/psum reorder float32 sums
EP_TP_RULES = (
  ('batch', None),
  ('exp', 'expert'),
  ('embed', None),
  ('mlp', 'model'),
  ('layers', None),
)
KERNELS = ('gate_proj', 'up_proj', 'down_proj')


def _x():
  return jax.random.normal(jax.random.key(1), (T, D))


def _ratio(got, want) -> float:
  got = [np.asarray(a, np.float64) for a in jax.tree.leaves(got)]
  want = [np.asarray(a, np.float64) for a in jax.tree.leaves(want)]
  worst = 0.0
  for g, w in zip(got, want, strict=True):
    bound = TOL['atol'] + TOL['rtol'] * np.abs(w)
    worst = max(worst, float(np.max(np.abs(g - w) / bound)))
  return worst


def _collectives(hlo: str) -> dict:
  """Collective ops of compiled HLO, and all-gathers of a whole kernel."""
  names = re.findall(r'\b(all-to-all|all-gather|all-reduce)\(', hlo)
  kernel_gathers = [
    line
    for line in hlo.splitlines()
    if 'all-gather(' in line
    and (f'[{E},{D},{H}]' in line or f'[{E},{H},{D}]' in line)
  ]
  return {
    'counts': {n: names.count(n) for n in sorted(set(names))},
    'kernel_gathers': len(kernel_gathers),
  }


def _nnx_layer(shared, impl):
  return fx.MoE(
    D, H, E, K, shared_hidden_features=shared, impl=impl, rngs=nnx.Rngs(0)
  )


def _nnx_loss(graphdef, state, x):
  y = nnx.merge(graphdef, state)(x)
  return jnp.sum(jnp.sin(y) ** 2), y


def nnx_case(mesh, rules, shared=None, impl='auto') -> dict:
  graphdef, ref_state = nnx.split(_nnx_layer(shared, impl))
  grad = jax.jit(
    jax.value_and_grad(_nnx_loss, argnums=1, has_aux=True), static_argnums=0
  )
  (_, want_y), want_g = grad(graphdef, ref_state, _x())
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    layer = _nnx_layer(shared, impl)
    graphdef, state = nnx.split(layer)
    shards = {
      n: list(
        getattr(layer, n)
        .kernel[...]
        .sharding.shard_shape(getattr(layer, n).kernel[...].shape)
      )
      for n in KERNELS
    }
    (_, y), g = grad(graphdef, state, _x())
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    hlo = fwd.lower(state, _x()).compile().as_text()
  return {
    'shards': shards,
    'ratio': {'output': _ratio(y, want_y), 'grads': _ratio(g, want_g)},
    'collectives': _collectives(hlo),
  }


def linen_case(mesh, rules) -> dict:
  layer = fl.MoE(H, E, K)
  params = nn.unbox(layer.init(jax.random.key(0), _x()))['params']

  def loss(p, x):
    y = layer.apply({'params': p}, x)
    return jnp.sum(jnp.sin(y) ** 2), y

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, want_y), want_g = grad(params, _x())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(layer.init, jax.random.key(0), _x())
    shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), mesh, rules
    )
    sharded = jax.device_put({'params': params}, shardings)['params']
    shards = {
      n: list(
        sharded[n]['kernel'].sharding.shard_shape(params[n]['kernel'].shape)
      )
      for n in KERNELS
    }
    (_, y), g = grad(sharded, _x())
    fwd = jax.jit(lambda p, x: layer.apply({'params': p}, x))
    hlo = fwd.lower(sharded, _x()).compile().as_text()
  return {
    'shards': shards,
    'ratio': {'output': _ratio(y, want_y), 'grads': _ratio(g, want_g)},
    'collectives': _collectives(hlo),
  }


def main() -> None:
  require_devices(8)
  ep = auto_mesh((2, 4), ('data', 'expert'))
  tp = auto_mesh((4, 2), ('expert', 'model'))
  cases = {
    'nnx_ep': lambda: nnx_case(ep, fx.EXPERT_PARALLEL_RULES),
    'linen_ep': lambda: linen_case(ep, fl.EXPERT_PARALLEL_RULES),
    'nnx_ep_tp': lambda: nnx_case(tp, EP_TP_RULES, shared=H),
    'nnx_ep_dense': lambda: nnx_case(
      ep, fx.EXPERT_PARALLEL_RULES, impl='dense'
    ),
  }
  report = {}
  for name, run in cases.items():
    try:
      report[name] = run()
    except Exception:
      report[name] = {'error': traceback.format_exc()[-3000:]}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
