"""The expert-parallel exchange on 8 simulated CPU devices (issue 19).

Run by ``tests/moe/test_ep_exchange.py`` as one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one JSON
object, per case a list of problems (empty: passed) or the figures the test
checks. Cases, on the meshes ``data=2, expert=4`` and ``expert=8``:

- ``budget_<mesh>``: ``ep_capacity_factor=1.0`` drops, per device and per
  peer, exactly the assignments past the budget in token order (a NumPy
  reference), reports them per device, and output and gradients equal one
  device's with those assignments dropped.
- ``capacity_<mesh>_<impl>``: ``capacity_factor`` under a mesh drops what one
  device drops and gives its output and gradients, every impl.
- ``bytes_expert8``: the compiled all-to-all bytes over the routed bytes,
  forward and backward, with ``ep_capacity_factor=1.25`` and dropless, on
  the mesh with the most peers (the budget's arithmetic is the same on
  both; each measurement compiles four steps at a larger shape).
- ``ragged``: the ``ragged_all_to_all`` exchange exports (``jax.export``) for
  TPU and CUDA, forward and backward; on CPU it runs and equals the padded
  exchange where XLA:CPU implements it, else the compile error is XLA's
  ``UNIMPLEMENTED`` (jax issue 34755).
"""

from __future__ import annotations

import json
import math
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxact
from benchmarks import moe_ep
from flaxact._src.moe import dispatch
from flaxact._src.moe.api import expert_product
from flaxact._src.moe.experts import parallel
from tests.multidevice import auto_mesh, require_devices

T, D, H, E, K = 64, 16, 24, 8, 2
RTOL = ATOL = 1e-5  # all-to-all reorders float32 sums
MESHES = {
  'data2_expert4': ((2, 4), ('data', 'expert')),
  'expert8': ((8,), ('expert',)),
}
#: The impls checked with ``capacity_factor`` on each mesh: every impl on
#: one of the two meshes (each case compiles a sharded step; all eight
#: doubled the CI time of this report).
CAPACITY_IMPLS = {
  'data2_expert4': ('loop', 'ragged'),
  'expert8': ('tiles', 'dense'),
}
BYTES_MESH = 'expert8'
PROD = expert_product('silu', None)
RAGGED = 'ragged_all_to_all'


def _args(mesh):
  ks = jax.random.split(jax.random.key(0), 5)
  arrays = (
    (jax.random.normal(ks[0], (T, D)), P(tuple(mesh.axis_names))),
    (jax.random.normal(ks[1], (D, E)), P()),
    (jax.random.normal(ks[2], (E, D, H)) / 4, P('expert')),
    (jax.random.normal(ks[3], (E, D, H)) / 4, P('expert')),
    (jax.random.normal(ks[4], (E, H, D)) / 5, P('expert')),
  )
  plain = [a for a, _ in arrays]
  return plain, [jax.device_put(a, NamedSharding(mesh, s)) for a, s in arrays]


def _close(name, got, want) -> list[str]:
  out = []
  for i, (g, w) in enumerate(
    zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  ):
    if not np.allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL):
      err = float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
      out.append(f'{name}[{i}] differs from one device: max error {err}')
  return out


def _loss(fn):
  return lambda *a: jnp.sum(jnp.sin(fn(*a)[0]) ** 2)


def _expected_drops(experts, devices, ep, budget):
  """NumPy: per device, per peer, the assignments past ``budget``."""
  per = np.asarray(experts).reshape(devices, -1)
  dropped = np.zeros(per.shape, bool)
  for dev in range(devices):
    seen = np.zeros(ep, int)
    for i, e in enumerate(per[dev]):
      peer = e // (E // ep)
      seen[peer] += 1
      dropped[dev, i] = seen[peer] > budget
  return dropped.reshape(T, K)


def budget_case(mesh) -> list[str]:
  plain, put = _args(mesh)
  ep = mesh.shape['expert']
  fn = lambda *a: flaxact.moe_ffn(
    *a, experts_per_token=K, mesh=mesh, impl='loop', ep_capacity_factor=1.0
  )
  y, aux = jax.jit(fn)(*put)
  budget = math.ceil(T // mesh.size * K / ep)
  want = _expected_drops(aux.experts, mesh.size, ep, budget)
  problems = []
  if not want.any():
    problems.append('the case drops nothing: it cannot test the budget')
  if not (np.asarray(aux.dropped) == want).all():
    problems.append(f'dropped {np.asarray(aux.dropped).sum()}, want {want}')
  per_device = want.reshape(mesh.size, -1).sum(1).tolist()
  if np.asarray(aux.dropped_per_device).tolist() != per_device:
    problems.append(f'per device {aux.dropped_per_device}, want {per_device}')
  if int(aux.dropped_tokens) != want.sum():
    problems.append(f'dropped_tokens {aux.dropped_tokens}, want {want.sum()}')

  def reference(x, router, *kernels):  # one device, those drops
    logits = x @ router
    w, e = flaxact.top_k_routing(logits, K)
    layout = dispatch.make_layout(jnp.where(want, E, e), E, 8)
    w = jnp.where(want, 0.0, w)
    y = dispatch.experts_ffn(
      x, w, layout, kernels, impl='loop', gated_product=PROD
    )
    return y, None

  problems += _close('output', y, jax.jit(reference)(*plain)[0])
  argnums = (0, 1, 2, 3, 4)
  g = jax.jit(jax.grad(_loss(fn), argnums))(*put)
  want_g = jax.jit(jax.grad(_loss(reference), argnums))(*plain)
  problems += _close('grads', g, want_g)
  return problems


def capacity_case(mesh, impl) -> list[str]:
  plain, put = _args(mesh)
  fn = lambda m: (
    lambda *a: flaxact.moe_ffn(
      *a, experts_per_token=K, mesh=m, impl=impl, capacity_factor=0.75
    )
  )
  want_y, want_aux = jax.jit(fn(None))(*plain)
  y, aux = jax.jit(fn(mesh))(*put)
  problems = []
  if not np.asarray(want_aux.dropped).any():
    problems.append('the case drops nothing')
  if not (np.asarray(aux.dropped) == np.asarray(want_aux.dropped)).all():
    problems.append('dropped differs from one device')
  problems += _close('output', y, want_y)
  argnums = (0, 1, 2, 3, 4)
  g = jax.jit(jax.grad(_loss(fn(mesh)), argnums))(*put)
  want_g = jax.jit(jax.grad(_loss(fn(None)), argnums))(*plain)
  problems += _close('grads', g, want_g)
  return problems


def bytes_case(mesh) -> dict:
  shape = (512, 128, 64, 16, 2)
  return {str(f): moe_ep.measure(mesh, f, shape) for f in (1.25, None)}


def ragged_case(mesh) -> dict:
  plain, put = _args(mesh)
  logits = plain[0] @ plain[1]
  w, e = flaxact.top_k_routing(logits, K)
  tokens = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  w, e = jax.device_put(w, tokens), jax.device_put(e, tokens)

  def fn(exchange):
    def run(x, w, e, *kernels):
      return parallel.expert_parallel_ffn(
        x, w, e, kernels, (None, None, None), mesh=mesh, impl='ragged',
        gated_product=PROD, exchange=exchange, ep_capacity_factor=1.25,
      ).y  # fmt: skip

    return jax.value_and_grad(lambda *a: jnp.sum(run(*a) ** 2), (0, 1, 3))

  args = (put[0], w, e, *put[2:])
  out: dict = {'exported': {}}
  for exchange in ('padded', 'ragged'):
    for platform in ('tpu', 'cuda'):
      # ragged_all_to_all has no export compatibility guarantee yet: an
      # export of the ragged exchange opts in, as users must.
      checks = [jax.export.DisabledSafetyCheck.custom_call(RAGGED)]
      exp = jax.export.export(
        jax.jit(fn(exchange)),
        platforms=[platform],
        disabled_checks=checks if exchange == 'ragged' else [],
      )
      text = exp(*args).mlir_module()
      out['exported'][f'{exchange}_{platform}'] = text.count(RAGGED)
  try:
    got = jax.jit(fn('ragged'))(*args)
  except Exception as err:  # XLA:CPU: not implemented (jax issue 34755)
    out['cpu'] = 'UNIMPLEMENTED' if 'UNIMPLEMENTED' in str(err) else str(err)
  else:
    out['cpu'] = 'runs'
    out['problems'] = _close('ragged', got, jax.jit(fn('padded'))(*args))
  return out


def main() -> None:
  require_devices(8)
  cases = {}
  for name, (shape, axes) in MESHES.items():
    mesh = auto_mesh(shape, axes)
    cases[f'budget_{name}'] = lambda m=mesh: budget_case(m)
    if name == BYTES_MESH:
      cases[f'bytes_{name}'] = lambda m=mesh: bytes_case(m)
    for impl in CAPACITY_IMPLS[name]:
      cases[f'capacity_{name}_{impl}'] = lambda m=mesh, i=impl: capacity_case(
        m, i
      )
  cases['ragged'] = lambda: ragged_case(auto_mesh((2, 4), ('data', 'expert')))
  report = {}
  with jax.default_matmul_precision('highest'):
    for name, run in cases.items():
      try:
        report[name] = run()
      except Exception:
        report[name] = {'error': traceback.format_exc()[-3000:]}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
