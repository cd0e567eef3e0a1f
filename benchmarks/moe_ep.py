"""Bytes the expert-parallel exchange moves, and its memory, from compiled HLO.

Run as ``python benchmarks/moe.py --ep [--json PATH]`` (or this file
directly). On 8 simulated CPU devices (set here through ``XLA_FLAGS`` before
JAX starts) it compiles :func:`flaxact.moe_ffn` expert-parallel (``'loop'``
experts, the CPU's padded ``all_to_all`` exchange) on the meshes
``data=2, expert=4`` and ``expert=8``, with ``ep_capacity_factor=1.25`` and
dropless (``None``), forward alone and forward+backward (``jax.grad``), and
reads from the compiled programs:

- the bytes of every all-to-all: :func:`all_to_all_bytes` sums the shapes of
  the ``all-to-all`` instructions of ``compiled.as_text()`` (an all-to-all's
  result has its operands' shapes) -- per device, times the devices;
- the ratio of those bytes to the bytes actually routed, ``T·k·d·4`` per
  direction (two directions forward: tokens out, outputs back; two
  backward), backward being forward+backward minus forward;
- each device's compiled temp memory (``memory_analysis()``).

Nothing is timed: every figure is deterministic, the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

#: ``tokens, d, hidden, experts, k`` of the measured layer.
SHAPE = (4096, 512, 256, 16, 2)
#: ``(name, mesh shape, mesh axes)``.
MESHES = (
  ('data=2,expert=4', (2, 4), ('data', 'expert')),
  ('expert=8', (8,), ('expert',)),
)
#: The per-peer budgets measured; ``None`` is dropless.
FACTORS = (1.25, None)
#: Issue 19's goal for ``ep_capacity_factor=1.25``: bytes / routed bytes.
GOAL = 1.3

_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
  's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
}  # fmt: skip
_A2A = re.compile(r'=\s*(.*?)\s(?:ragged-)?all-to-all(?:-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')


def all_to_all_bytes(hlo: str) -> int:
  """Bytes of every all-to-all in compiled HLO text, for one device.

  Sums the result shapes of the ``all-to-all`` instructions (a tuple result
  has one element per operand, each its operand's shape).

  Args:
    hlo: ``compiled.as_text()``.

  Returns:
    The bytes of all their operands.
  """
  total = 0
  for line in hlo.splitlines():
    found = _A2A.search(line)
    if not found:
      continue
    for dtype, dims in _SHAPE.findall(found.group(1)):
      size = math.prod(int(n) for n in dims.split(',') if n)
      total += size * _BYTES[dtype]
  return total


def _inputs(mesh, shape):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  t, d, h, e, _ = shape
  ks = jax.random.split(jax.random.key(0), 5)
  tokens = P(tuple(mesh.axis_names))
  arrays = (
    (jax.random.normal(ks[0], (t, d)), tokens),
    (jax.random.normal(ks[1], (d, e)), P()),
    (jax.random.normal(ks[2], (e, d, h)) / d**0.5, P('expert')),
    (jax.random.normal(ks[3], (e, d, h)) / d**0.5, P('expert')),
    (jax.random.normal(ks[4], (e, h, d)) / h**0.5, P('expert')),
  )
  return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in arrays]


def measure(mesh, factor, shape=SHAPE) -> dict:
  """The exchange's bytes and memory for one mesh and ``factor``."""
  import jax
  import jax.numpy as jnp

  import flaxact

  t, d, _, _, k = shape
  args = _inputs(mesh, shape)

  def forward(*a):
    return flaxact.moe_ffn(
      *a,
      experts_per_token=k,
      impl='loop',
      mesh=mesh,
      ep_capacity_factor=factor,
    )

  def loss(*a):
    return jnp.sum(forward(*a)[0] ** 2)

  fwd = jax.jit(forward).lower(*args).compile()
  step = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*args).compile()
  devices = mesh.size
  fwd_bytes = all_to_all_bytes(fwd.as_text() or '') * devices
  bwd_bytes = all_to_all_bytes(step.as_text() or '') * devices - fwd_bytes
  routed = t * k * d * 4  # one direction
  aux = jax.jit(forward)(*args)[1]
  return {
    'fwd_bytes': fwd_bytes,
    'bwd_bytes': bwd_bytes,
    'routed_bytes': routed,
    'fwd_ratio': fwd_bytes / (2 * routed),
    'bwd_ratio': bwd_bytes / (2 * routed),
    'fwd_temp_bytes': _temp(fwd),
    'step_temp_bytes': _temp(step),
    'dropped': int(aux.dropped_tokens),
    'assignments': t * k,
  }


def _temp(compiled) -> int:
  """Compiled temp memory per device, bytes."""
  stats = compiled.memory_analysis()
  assert stats is not None, 'this backend has no memory analysis'
  return stats.temp_size_in_bytes


def run(shape=SHAPE) -> dict:
  """Every mesh and factor of the table: ``{mesh: {factor: figures}}``."""
  import jax

  if jax.device_count() < 8:
    raise SystemExit(
      f'moe_ep needs 8 devices, JAX sees {jax.device_count()}: run'
      ' benchmarks/moe.py --ep in a fresh process (it sets XLA_FLAGS).'
    )
  auto = jax.sharding.AxisType.Auto
  out = {}
  for name, dims, axes in MESHES:
    mesh = jax.make_mesh(dims, axes, axis_types=(auto,) * len(axes))
    out[name] = {
      str(factor): measure(mesh, factor, shape) for factor in FACTORS
    }
  return out


def _print(results: dict, shape) -> None:
  t, d, h, e, k = shape
  print(
    f'Expert-parallel exchange, T={t} d={d} hidden={h} E={e} k={k}, float32,'
    ' 8 simulated CPU devices (padded all_to_all); bytes over all devices'
    ' / routed bytes (T·k·d·4 per direction)'
  )
  head = (
    f'{"mesh":<17}{"ep_capacity":>12}{"fwd MiB":>9}{"fwd ratio":>10}'
    f'{"bwd ratio":>10}{"temp fwd MiB":>13}{"temp step MiB":>14}'
    f'{"dropped":>12}'
  )
  print(head)
  mib = 2.0**20
  for mesh, rows in results.items():
    for factor, r in rows.items():
      label = 'dropless' if factor == 'None' else factor
      print(
        f'{mesh:<17}{label:>12}{r["fwd_bytes"] / mib:>9.1f}'
        f'{r["fwd_ratio"]:>10.3f}{r["bwd_ratio"]:>10.3f}'
        f'{r["fwd_temp_bytes"] / mib:>13.1f}'
        f'{r["step_temp_bytes"] / mib:>14.1f}'
        f'{r["dropped"]:>7}/{r["assignments"]}'
      )
  print(f'goal: ratio <= {GOAL} with ep_capacity_factor=1.25')


def main(argv=None) -> dict:
  """Prints the table (and writes ``--json``); returns the figures."""
  p = argparse.ArgumentParser(description=(__doc__ or '').splitlines()[0])
  p.add_argument('--json', help='write the figures to this path')
  p.add_argument(
    '--shape',
    default=','.join(map(str, SHAPE)),
    help='tokens,d,hidden,experts,k',
  )
  a = p.parse_args(argv)
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = (
      f'{flags} --xla_force_host_platform_device_count=8'.strip()
    )
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  shape = tuple(int(n) for n in a.shape.split(','))
  results = run(shape)
  _print(results, shape)
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'shape': shape, 'goal': GOAL, 'meshes': results}, f, indent=1)
  return results


if __name__ == '__main__':
  main()
