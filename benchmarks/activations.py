"""Forward and forward+backward time of every activation, as ratios to relu.

Each activation is timed on one large array in three modes: forward
(``y = f(x)``), backward (``dx = vjp(f, x)(g)``, recomputing from the saved
input as a backward pass does) and forward+backward (``y`` and ``dx`` in one
jitted call), beside ``jax.nn``'s function of the same name where there is
one. Every timing is the minimum over interleaved rounds,
so machine noise hits all functions alike; the table reports ratios measured
in this one run.

Usage:
  python benchmarks/activations.py                 # 2**23 elements, f32+bf16
  python benchmarks/activations.py --size 1048576 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import flaxact

# flaxact name -> jax.nn callable with the same semantics (None: no twin).
JAX_NN: dict[str, Callable | None] = {
  'relu': jax.nn.relu,
  'relu6': jax.nn.relu6,
  'leaky_relu': jax.nn.leaky_relu,
  'relu_squared': None,
  'hard_sigmoid': jax.nn.hard_sigmoid,
  'hard_silu': jax.nn.hard_silu,
  'identity': None,
  'elu': jax.nn.elu,
  'selu': jax.nn.selu,
  'celu': jax.nn.celu,
  'sigmoid': jax.nn.sigmoid,
  'tanh': jnp.tanh,
  'softplus': jax.nn.softplus,
  'silu': jax.nn.silu,
  'swish': jax.nn.swish,
  'quick_gelu': None,
  'mish': jax.nn.mish,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


MODES = ('fwd', 'bwd', 'fwd+bwd')


def _forward(fn):
  return jax.jit(fn)


def _forward_backward(fn):
  def step(x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]

  return jax.jit(step)


def _backward(fn):
  def step(x, g):
    return jax.vjp(fn, x)[1](g)[0]

  return jax.jit(step)


def _time(call, args, repeats: int) -> float:
  jax.block_until_ready(call(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call(*args))
    best = min(best, time.perf_counter() - start)
  return best


def run(size: int, dtypes, rounds: int, repeats: int) -> list[dict]:
  """Times every registered element-wise activation; returns table rows."""
  rows = []
  for dtype in dtypes:
    key_x, key_g = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(key_x, (size,), jnp.float32) * 3).astype(dtype)
    g = jax.random.normal(key_g, (size,), jnp.float32).astype(dtype)
    calls = {}
    for name, twin in JAX_NN.items():
      ours = getattr(flaxact, name)
      for lib, fn in (('flaxact', ours), ('jax.nn', twin)):
        if fn is None:
          continue
        calls[(lib, name, 'fwd')] = (_forward(fn), (x,))
        calls[(lib, name, 'bwd')] = (_backward(fn), (x, g))
        calls[(lib, name, 'fwd+bwd')] = (_forward_backward(fn), (x, g))
    best = dict.fromkeys(calls, float('inf'))
    for _ in range(rounds):  # interleaved: noise spreads over all entries
      for key, (call, args) in calls.items():
        best[key] = min(best[key], _time(call, args, repeats))
    for name, twin in JAX_NN.items():
      row = {'dtype': jnp.dtype(dtype).name, 'activation': name}
      for mode in MODES:
        relu = best[('flaxact', 'relu', mode)]
        ours = best[('flaxact', name, mode)]
        row[f'{mode}_ms'] = ours * 1e3
        row[f'{mode}_vs_relu'] = ours / relu
        if twin is not None:
          theirs = best[('jax.nn', name, mode)]
          row[f'{mode}_jax_nn_vs_relu'] = theirs / relu
          row[f'{mode}_vs_jax_nn'] = ours / theirs
      rows.append(row)
  return rows


def _fmt(value) -> str:
  return '-' if value is None else f'{value:.2f}'


def print_table(rows: list[dict]) -> None:
  """Prints the rows as a markdown table: time ratios to relu."""
  head = ['dtype', 'activation']
  for mode in MODES:
    head += [f'{mode} / relu', f'jax.nn {mode} / relu', f'{mode} / jax.nn']
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for r in rows:
    cells = [r['dtype'], r['activation']]
    for mode in MODES:
      cells += [
        _fmt(r[f'{mode}_vs_relu']),
        _fmt(r.get(f'{mode}_jax_nn_vs_relu')),
        _fmt(r.get(f'{mode}_vs_jax_nn')),
      ]
    print('| ' + ' | '.join(cells) + ' |')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--size',
    type=int,
    default=1 << 23,
    help='elements per array (default 2**23)',
  )
  parser.add_argument(
    '--dtypes',
    default='float32,bfloat16',
    help='comma-separated dtypes (default float32,bfloat16)',
  )
  parser.add_argument(
    '--rounds', type=int, default=5, help='interleaved rounds (default 5)'
  )
  parser.add_argument(
    '--repeats',
    type=int,
    default=3,
    help='timed calls per entry and round (default 3)',
  )
  parser.add_argument(
    '--json', metavar='PATH', help='also write the figures to this JSON file'
  )
  args = parser.parse_args(argv)
  dtypes = [jnp.dtype(d) for d in args.dtypes.split(',')]
  rows = run(args.size, dtypes, args.rounds, args.repeats)
  cpu = platform.processor() or platform.machine()
  print(
    f'# {args.size} elements, min of {args.rounds} interleaved rounds x'
    f' {args.repeats} calls; jax {jax.__version__},'
    f' {jax.devices()[0].platform}, {cpu}'
  )
  print_table(rows)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'size': args.size,
          'rounds': args.rounds,
          'repeats': args.repeats,
          'jax': jax.__version__,
          'device': str(jax.devices()[0]),
          'rows': rows,
        },
        f,
        indent=2,
      )


if __name__ == '__main__':
  main()
