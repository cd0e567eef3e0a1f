"""Stacked FFN layers on 8 simulated CPU devices, every exported rule set.

Run by ``tests/layers/test_stacked_sharding.py`` as one subprocess started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. For each case (a
stacking transform x a layer x a rule set) it builds a stack of ``L`` layers
with the stacked axis named ``'layers'`` (the README's recipe), sharded at
creation on the mesh, takes one optax training step there and the same step
on an unsharded stack, and prints one JSON object: per case, the
``PartitionSpec`` of every parameter before and after the step, the spec the
contract's logical axes and the rule set give, and how far the sharded loss,
output and updated parameters are from the unsharded ones. The pytest side
checks each case.

Stacks:

- ``nnx_scan``: created with ``nnx.vmap``, run as a residual stack with
  ``nnx.scan`` (both with ``transform_metadata={nnx.PARTITION_NAME:
  'layers'}``).
- ``nnx_vmap``: created with ``nnx.vmap``, every layer applied to the same
  input with ``nnx.vmap`` (an ensemble), outputs summed.
- ``linen_scan``: ``nn.scan`` with ``metadata_params={nn.PARTITION_NAME:
  'layers'}``, a residual stack.

Layers: ``GatedFFN`` (``SwiGLU``) and ``FFN`` in every stack; ``MoE``
(softmax router) and ``MoE-sigmoid`` (sigmoid router, whose non-trainable
``score_correction_bias`` -- ``nnx.BatchStat`` / Linen ``'batch_stats'`` --
is stacked too and set to nonzero values so routing depends on it) in the
two residual stacks. Under ``EXPERT_PARALLEL_RULES`` (mesh ``data=2,
expert=4``) the stacked MoE runs expert-parallel (``shard_map`` with
all-to-all) inside the scan.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.multidevice import auto_mesh, require_devices

B, D, H, L = 8, 16, 32, 4
# MoE: expert hidden width, experts, experts per token.
H_MOE, E, K = 16, 4, 2
STACKS = ('nnx_scan', 'nnx_vmap', 'linen_scan')
LAYERS = ('GatedFFN', 'FFN', 'MoE', 'MoE-sigmoid')
# The ensemble stack runs dense layers only.
STACK_LAYERS = {
  'nnx_scan': LAYERS,
  'nnx_vmap': ('GatedFFN', 'FFN'),
  'linen_scan': LAYERS,
}
META = {nnx.PARTITION_NAME: 'layers'}
STATS = 'batch_stats'  # key prefix of non-trainable variables
# An all-reduce sums partial products in another order than one matmul does,
# and four layers compound it (as tests/sharding_cases.py, one layer: 1e-5).
TOL = dict(rtol=1e-5, atol=1e-5)
# Logical axes of each parameter, from the contract (not read off the layer).
AXES = {
  ('gate_proj', 'kernel'): ('embed', 'mlp'),
  ('up_proj', 'kernel'): ('embed', 'mlp'),
  ('down_proj', 'kernel'): ('mlp', 'embed'),
  ('gate_proj', 'bias'): ('mlp',),
  ('up_proj', 'bias'): ('mlp',),
  ('down_proj', 'bias'): ('embed',),
}
MOE_AXES = {
  ('router', 'kernel'): ('embed', None),
  ('gate_proj', 'kernel'): ('exp', 'embed', 'mlp'),
  ('up_proj', 'kernel'): ('exp', 'embed', 'mlp'),
  ('down_proj', 'kernel'): ('exp', 'mlp', 'embed'),
  # Non-trainable, no logical axes: replicated.
  (STATS, 'score_correction_bias'): (None,),
}


def rule_sets() -> dict[str, tuple]:
  """Every rule set ``flaxact.nnx`` and ``flaxact.linen`` export."""
  names = sorted(n for n in fx.__all__ if n.endswith('_RULES'))
  found = {}
  for name in names:
    if getattr(fl, name) != getattr(fx, name):
      raise ValueError(f'{name} differs between flaxact.linen and .nnx')
    found[name] = getattr(fx, name)
  return found


# Every case compiles a sharded and an unsharded step, so the matrix is cut
# where the cases would check the same code: the rule sets differ only in
# where the logical axes go, and a layer's parameters take them the same way
# in every stack. So: `GatedFFN` under every rule set in the two residual
# stacks, the other dense cases under the set that maps both 'embed' and
# 'mlp'; the softmax MoE under the expert-parallel set and one set that
# does not name 'expert' (NNX passes a logical name the rules do not map to
# the mesh unchanged, so every rule set must map 'exp': checked for all of
# them statically below, and at run time here), the sigmoid router's stacked
# bias once per stack, expert-parallel.
BOTH_AXES = ('FSDP_TENSOR_PARALLEL_RULES',)
ONLY_RULES = {
  ('nnx_scan', 'FFN'): BOTH_AXES,
  ('linen_scan', 'FFN'): BOTH_AXES,
  ('nnx_vmap', 'GatedFFN'): ('FSDP_RULES', 'TENSOR_PARALLEL_RULES'),
  ('nnx_vmap', 'FFN'): BOTH_AXES,
  ('nnx_scan', 'MoE'): ('EXPERT_PARALLEL_RULES', 'FSDP_TENSOR_PARALLEL_RULES'),
  ('linen_scan', 'MoE'): ('EXPERT_PARALLEL_RULES', 'TENSOR_PARALLEL_RULES'),
  ('nnx_scan', 'MoE-sigmoid'): ('EXPERT_PARALLEL_RULES',),
  ('linen_scan', 'MoE-sigmoid'): ('EXPERT_PARALLEL_RULES',),
}


def cases() -> list[tuple[str, str, str]]:
  """``(stack, layer, rule set name)`` of every case, in the order they run."""
  return [
    (s, layer, r)
    for s in STACKS
    for layer in STACK_LAYERS[s]
    for r in rule_sets()
    if r in ONLY_RULES.get((s, layer), (r,))
  ]


def case_ids() -> list[str]:
  """``stack-layer-RULES`` for every case, in the order they run."""
  return ['-'.join(case) for case in cases()]


def make_mesh(rules) -> jax.sharding.Mesh:
  """A 2 x 4 mesh (8 x 1 for one axis) over the axes ``rules`` names."""
  axes = []
  for _, mesh_axis in rules:
    for a in mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,):
      if a is not None and a not in axes:
        axes.append(a)
  shape = {1: (8,), 2: (2, 4)}[len(axes)]
  return auto_mesh(shape, tuple(axes))


def expected_spec(rules, logical) -> list:
  """The mesh axis of each logical name: the first rule for it, else None."""
  table = {}
  for name, mesh_axis in rules:
    table.setdefault(name, mesh_axis)
  return [table.get(name) for name in logical]


def _spec(array) -> list:
  spec = list(array.sharding.spec)
  return spec + [None] * (array.ndim - len(spec))


def _layer(kind, *, rngs=None):
  if kind.startswith('MoE'):
    # 'tiles': where the parameters go does not depend on the impl, and
    # 'tiles' compiles in half the time of 'loop' (CPU's 'auto'; the impls
    # under a mesh are checked in tests/moe/test_ep_exchange.py).
    router = 'sigmoid' if kind == 'MoE-sigmoid' else 'softmax'
    kw = dict(router=router, impl='tiles')
    if rngs:
      return fx.MoE(D, H_MOE, E, K, **kw, rngs=rngs)
    return fl.MoE(H_MOE, num_experts=E, experts_per_token=K, **kw)
  if kind == 'GatedFFN':
    return fx.SwiGLU(D, H, rngs=rngs) if rngs else fl.SwiGLU(H)
  return fx.FFN(D, H, rngs=rngs) if rngs else fl.FFN(H)


def _bias():
  """A nonzero stacked ``score_correction_bias`` ``(L, E)``."""
  return 0.1 * jax.random.normal(jax.random.key(2), (L, E))


def _loss(y):
  return jnp.mean(jnp.sin(y) ** 2)


def _tx():
  return optax.sgd(0.1, momentum=0.9)


# ------------------------------------------------------------------- NNX


def _nnx_create(kind):
  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=META)
  def create(rngs):
    return _layer(kind, rngs=rngs)

  layers = create(nnx.Rngs(0))
  if kind == 'MoE-sigmoid':
    bias = layers.score_correction_bias
    bias[...] = jax.device_put(_bias(), bias[...].sharding)
  return layers


def _nnx_forward(stack, layers, x):
  if stack == 'nnx_scan':

    @nnx.scan(
      in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=META
    )
    def body(x, layer):
      return x + layer(x)

    return body(x, layers)

  @nnx.vmap(in_axes=(0, None), out_axes=0, transform_metadata=META)
  def each(layer, x):
    return layer(x)

  return jnp.sum(each(layers, x), axis=0)


def _nnx_step(stack, layers, optimizer, x):
  def loss(layers):
    y = _nnx_forward(stack, layers, x)
    return _loss(y), y

  (value, y), grads = nnx.value_and_grad(loss, has_aux=True)(layers)
  optimizer.update(layers, grads)
  return value, y


def _nnx_params(layers) -> dict:
  """Parameters by path; ``nnx.BatchStat`` variables under ``STATS``."""
  flat = nnx.to_flat_state(nnx.state(layers, nnx.Param))
  found = {tuple(map(str, path)): v[...] for path, v in flat}
  for path, v in nnx.to_flat_state(nnx.state(layers, nnx.BatchStat)):
    found[(STATS, str(path[-1]))] = v[...]
  return found


def _x():
  return jax.random.normal(jax.random.key(1), (B, D))


def nnx_reference(stack, kind):
  """Updated parameters and ``(loss, output)`` of one unsharded step."""
  layers = _nnx_create(kind)
  optimizer = nnx.Optimizer(layers, _tx(), wrt=nnx.Param)
  got = nnx.jit(_nnx_step, static_argnums=0)(stack, layers, optimizer, _x())
  return _nnx_params(layers), got


def nnx_sharded(stack, kind, rules, mesh):
  """Specs at creation, updated parameters and ``(loss, output)``."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    layers = _nnx_create(kind)
    optimizer = nnx.Optimizer(layers, _tx(), wrt=nnx.Param)
    before = {k: _spec(a) for k, a in _nnx_params(layers).items()}
    x = jax.device_put(
      _x(), jax.sharding.NamedSharding(mesh, logical_spec(rules, 'batch'))
    )
    got = nnx.jit(_nnx_step, static_argnums=0)(stack, layers, optimizer, x)
  return before, _nnx_params(layers), got


# ----------------------------------------------------------------- Linen


class _Block(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x, _):
    return x + _layer(self.kind)(x), None


def _linen_stack(kind):
  return nn.scan(
    _Block,
    variable_axes={'params': 0, STATS: 0, 'intermediates': 0},
    split_rngs={'params': True},
    length=L,
    metadata_params={nn.PARTITION_NAME: 'layers'},
  )(kind)


def _linen_step(model, params, stats, opt_state, x):
  def loss(p):
    y = model.apply({'params': p, **stats}, x, None)[0]
    return _loss(y), y

  (value, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, opt_state = _tx().update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, (value, y)


def _linen_variables(variables):
  """``(params, stats)``: ``stats`` is ``{}`` or ``{STATS: ...}``, set to
  :func:`_bias` (the same values as the NNX stack)."""
  variables = nn.unbox(variables)
  stats = {}
  if STATS in variables:
    stats = jax.tree.map(
      lambda a: jax.device_put(_bias().astype(a.dtype), a.sharding),
      {STATS: variables[STATS]},
    )
  return variables['params'], stats


def _linen_flat(params, stats) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  found = {tuple(k.key for k in path[-2:]): a for path, a in flat}
  for path, a in jax.tree_util.tree_flatten_with_path(stats)[0]:
    found[(STATS, path[-1].key)] = a
  return found


def linen_reference(kind):
  """Updated parameters and ``(loss, output)`` of one unsharded step."""
  model = _linen_stack(kind)
  params, stats = _linen_variables(model.init(jax.random.key(0), _x(), None))
  step = jax.jit(_linen_step, static_argnums=0)
  new, _, got = step(model, params, stats, _tx().init(params), _x())
  return _linen_flat(new, stats), got


def linen_sharded(kind, rules, mesh):
  """Specs at init, updated parameters and ``(loss, output)``."""
  model = _linen_stack(kind)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), _x(), None)
    shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), mesh, rules
    )
    init = jax.jit(model.init, out_shardings=shardings)
    params, stats = _linen_variables(init(jax.random.key(0), _x(), None))
    before = {k: _spec(a) for k, a in _linen_flat(params, stats).items()}
    x = jax.device_put(
      _x(), jax.sharding.NamedSharding(mesh, logical_spec(rules, 'batch'))
    )
    opt_state = jax.jit(_tx().init)(params)
    new, _, got = jax.jit(_linen_step, static_argnums=0)(
      model, params, stats, opt_state, x
    )
  return before, _linen_flat(new, stats), got


# ------------------------------------------------------------------ cases


def logical_spec(rules, *logical):
  """The ``PartitionSpec`` that ``rules`` give the logical axes."""
  return jax.sharding.PartitionSpec(*expected_spec(rules, logical))


def _allclose_ratio(got, want) -> float:
  """Max of ``|got - want| / (atol + rtol |want|)``: at most 1 passes."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  bound = TOL['atol'] + TOL['rtol'] * np.abs(want)
  return float(np.max(np.abs(got - want) / bound))


@functools.cache
def reference(stack, kind):
  """The unsharded step, once per stack and layer."""
  if stack == 'linen_scan':
    return linen_reference(kind)
  return nnx_reference(stack, kind)


def run_case(stack, kind, rules) -> dict:
  mesh = make_mesh(rules)
  if stack == 'linen_scan':
    before, new, got = linen_sharded(kind, rules, mesh)
  else:
    before, new, got = nnx_sharded(stack, kind, rules, mesh)
  ref, want = reference(stack, kind)
  specs = {}
  axes = MOE_AXES if kind.startswith('MoE') else AXES
  for key, array in new.items():
    logical = ('layers', *axes[key[-2:]])
    specs['/'.join(key)] = {
      'before': before[key],
      'after': _spec(array),
      'want': expected_spec(rules, logical),
    }
  return {
    'specs': specs,
    'devices': len(got[1].sharding.device_set),
    'ratio': {
      'loss': _allclose_ratio(got[0], want[0]),
      'output': _allclose_ratio(got[1], want[1]),
      **{'/'.join(k): _allclose_ratio(new[k], ref[k]) for k in ref},
    },
  }


def main() -> None:
  require_devices(8)
  results = {}
  with jax.default_matmul_precision('highest'):
    for stack, kind, name in cases():
      case = f'{stack}-{kind}-{name}'
      start = time.perf_counter()
      try:
        results[case] = run_case(stack, kind, rule_sets()[name])
      except Exception:  # reported per case; the pytest side fails it
        results[case] = {'error': traceback.format_exc()}
      seconds = time.perf_counter() - start
      print(f'{case}: {seconds:.1f} s', file=sys.stderr)
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
