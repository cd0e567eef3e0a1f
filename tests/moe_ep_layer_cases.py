"""MoE layers at scale on 8 simulated CPU devices (issue 19).

Run by ``tests/layers/test_moe_ep_layers.py`` as one subprocess started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one JSON
object: per case, how far the sharded output and gradients are from the
unsharded layer's (an allclose ratio: at most 1 passes), what the layer
recorded about drops, the all-gathers of expert or shared-expert kernels and
the all-reduces in the compiled training step, and (NNX, one layer: the
Linen layer and the stacks run the same sharded body) the platforms a
``jax.export`` of the sharded step succeeded for. The one argument,
``layer`` or ``scan``, picks the stack.

A case is a framework (``nnx``, ``linen``) x a configuration x a stack
(``layer``: one layer; ``scan``: ``L`` layers in a residual
``nnx.scan``/``nn.scan``). Configurations (:data:`CONFIGS`):

- ``budget``: mesh ``data=2, expert=4``, ``EXPERT_PARALLEL_RULES``,
  ``ep_capacity_factor=3.0`` (this routing drops nothing, so the layer
  equals the unsharded one; the drops themselves are checked in
  ``tests/moe/test_ep_exchange.py``);
- ``capacity``: the same mesh with ``capacity_factor=1.0`` (drops, the same
  as one device's);
- ``tp``: mesh ``expert=4, model=2``, ``'exp'`` on ``'expert'`` and
  ``'mlp'`` on ``'model'``: tensor-parallel experts (with biases) and shared
  expert, ``ep_capacity_factor=2.0``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.multidevice import auto_mesh, require_devices

T, D, H, E, K, L = 64, 8, 16, 8, 2, 2
# all-to-all/psum reorder float32 sums; a kernel gradient sums T·L terms,
# so the absolute part scales with each leaf's largest value.
RTOL = 1e-5
EP_TP_RULES = (
  ('batch', None),
  ('exp', 'expert'),
  ('embed', None),
  ('mlp', 'model'),
  ('layers', None),
)
META = {nnx.PARTITION_NAME: 'layers'}
#: name: (mesh shape, mesh axes, rules, MoE options)
CONFIGS = {
  'budget': (
    (2, 4),
    ('data', 'expert'),
    fx.EXPERT_PARALLEL_RULES,
    dict(ep_capacity_factor=3.0),
  ),
  'capacity': (
    (2, 4),
    ('data', 'expert'),
    fx.EXPERT_PARALLEL_RULES,
    dict(capacity_factor=1.0),
  ),
  'tp': (
    (4, 2),
    ('expert', 'model'),
    EP_TP_RULES,
    dict(ep_capacity_factor=2.0, use_bias=True, shared_hidden_features=H),
  ),
}
PLATFORMS = ('tpu', 'cuda')
#: The configurations each stack runs: a scanned stack adds the layers axis
#: around the same sharded body, so one configuration checks it.
STACK_CONFIGS = {'layer': tuple(CONFIGS), 'scan': ('budget',)}


def _x():
  return jax.random.normal(jax.random.key(1), (T, D))


def _ratio(got, want) -> float:
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    bound = RTOL * (np.abs(w) + np.max(np.abs(w), initial=1.0))
    worst = max(worst, float(np.max(np.abs(g - w) / bound)))
  return worst


def kernel_gathers(hlo: str) -> list[str]:
  """All-gathers whose result ends in a kernel's ``(D, H)`` or ``(H, D)``
  (any split of ``H``): an expert or shared-expert kernel gathered."""
  dims = '|'.join(f'{a},{b}' for h in (H, H // 2) for a, b in ((D, h), (h, D)))
  pattern = re.compile(rf'\[(?:\d+,)*(?:{dims})\]\S* all-gather(?:-start)?\(')
  return [
    line.strip()[:200] for line in hlo.splitlines() if pattern.search(line)
  ]


def _run_compiled(step, *args) -> tuple[object, dict]:
  """Runs ``step`` compiled once; its result and the compiled collectives."""
  compiled = jax.jit(step).lower(*args).compile()
  hlo = compiled.as_text() or ''
  return compiled(*args), {
    'kernel_gathers': kernel_gathers(hlo),
    'all_reduces': len(re.findall(r'\ball-reduce(?:-start)?\(', hlo)),
  }


def _exports(step, *args) -> list[str]:
  done = []
  for platform in PLATFORMS:
    jax.export.export(step, platforms=[platform])(*args)
    done.append(platform)
  return done


def _loss(y):
  return jnp.sum(jnp.sin(y) ** 2)


# ------------------------------------------------------------------- NNX


class _NNXStack(nnx.Module):
  """``L`` MoE layers (stacked on a ``'layers'`` axis) in a residual scan."""

  def __init__(self, options):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=META)
    def create(rngs):
      return fx.MoE(D, H, E, K, **options, rngs=rngs)

    self.layers = create(nnx.Rngs(0))

  def __call__(self, x):
    @nnx.scan(
      in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=META
    )
    def body(x, layer):
      return x + layer(x)

    return body(x, self.layers)


def _nnx_model(options, stack):
  if stack == 'layer':
    return fx.MoE(D, H, E, K, **options, rngs=nnx.Rngs(0))
  return _NNXStack(options)


def nnx_case(config, stack) -> dict:
  shape, axes, rules, options = CONFIGS[config]

  def step(graphdef, state, x):
    def loss(state, x):
      model = nnx.merge(graphdef, state)
      y, found = nnx.capture(model, nnx.Intermediate)(x)
      return _loss(y), (y, found)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)

  graphdef, state = nnx.split(_nnx_model(options, stack))
  jitted = jax.jit(step, static_argnums=0)
  (_, (want_y, _)), want_g = jitted(graphdef, state, _x())
  with jax.set_mesh(auto_mesh(shape, axes)), nnx.logical_axis_rules(rules):
    graphdef, state = nnx.split(_nnx_model(options, stack))
    fn = functools.partial(step, graphdef)
    ((_, (y, found)), g), out = _run_compiled(fn, state, _x())
    if stack == 'layer':
      out['exported'] = _exports(jax.jit(fn), state, _x())
  out['ratio'] = {'output': _ratio(y, want_y), 'grads': _ratio(g, want_g)}
  out['recorded'] = _drops(nnx.to_pure_dict(found))
  return out


# ----------------------------------------------------------------- Linen


class _LinenStack(nn.Module):
  """``L`` MoE layers in a residual ``nn.scan`` (axis ``'layers'``)."""

  options: dict

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      _Block,
      variable_axes={'params': 0, 'intermediates': 0},
      split_rngs={'params': True},
      length=L,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    return scan(self.options)(x, None)[0]


class _Block(nn.Module):
  options: dict

  @nn.compact
  def __call__(self, x, _):
    return x + fl.MoE(H, E, K, **self.options)(x), None


def _linen_model(options, stack):
  if stack == 'layer':
    return fl.MoE(H, E, K, **options)
  return _LinenStack(options)


def linen_case(config, stack) -> dict:
  shape, axes, rules, options = CONFIGS[config]
  model = _linen_model(options, stack)
  params = nn.unbox(model.init(jax.random.key(0), _x()))['params']

  def step(p, x):
    def loss(p, x):
      y, found = model.apply({'params': p}, x, mutable=['intermediates'])
      return _loss(y), (y, found)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)

  (_, (want_y, _)), want_g = jax.jit(step)(params, _x())
  mesh = auto_mesh(shape, axes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), _x())
    shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), mesh, rules
    )
    sharded = jax.device_put({'params': params}, shardings)['params']
    ((_, (y, found)), g), out = _run_compiled(step, sharded, _x())
  out['ratio'] = {'output': _ratio(y, want_y), 'grads': _ratio(g, want_g)}
  out['recorded'] = _drops(found)
  return out


def _drops(found) -> dict:
  """What the layers recorded about drops, by name: shapes and totals."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(found)[0]:
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    name = next((n for n in names if n.startswith('dropped')), None)
    if name is not None:
      value = np.asarray(value)
      out[name] = {'shape': list(value.shape), 'sum': int(value.sum())}
  return out


def main(stack: str) -> None:
  require_devices(8)
  report = {}
  for config in STACK_CONFIGS[stack]:
    for framework, case in (('nnx', nnx_case), ('linen', linen_case)):
      name = f'{framework}_{config}_{stack}'
      try:
        report[name] = case(config, stack)
      except Exception:
        report[name] = {'error': traceback.format_exc()[-3000:]}
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1])
