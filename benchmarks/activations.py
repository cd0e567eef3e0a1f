r"""Forward and forward+backward time of every activation, as ratios.

Each activation is timed on one large array in three modes: forward
(``y = f(x)``), backward (``dx = vjp(f, x)(g)`` with a random cotangent ``g``,
recomputing from the saved input as a backward pass does) and
forward+backward (``y`` and ``dx`` in one jitted call), beside ``jax.nn``'s
function of the same name where there is one.

Clocks: ``--clock wall`` (default) times each call on the wall clock;
``--clock process`` counts the CPU time of all the process's threads, which
other jobs on a shared machine disturb much less. On CPU a large part of
either is the kernel's page faults on the freshly allocated outputs (at
2**23 float32 elements, about four fifths of relu's time), the same for
every function, which pulls every ratio towards 1.

Noise: every round times every entry (the minimum of ``--repeats`` calls),
in a fresh random order, so machine noise spreads over all entries.
Ratios to ``relu`` are ratios of the minima over rounds. Ratios to ``jax.nn``
are given three ways: the ratio of the minima, the median of the per-round
ratios (ours and jax.nn's time from the same round), and that median's
spread as the 10th-90th percentile of the per-round ratios. On a shared
machine, trust a difference only where the spreads do not overlap 1.

Usage:
  python -m benchmarks.activations                        # full table
  python -m benchmarks.activations --only sigmoid,tanh --dtypes float32 \\
      --modes fwd+bwd --sizes 8388608,16777216 --rounds 21 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
  return fn


def _forward_backward(fn):
  def step(x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]

  return step


def _backward(fn):
  def step(x, g):
    return jax.vjp(fn, x)[1](g)[0]

  return step


_BUILD = {'fwd': _forward, 'bwd': _backward, 'fwd+bwd': _forward_backward}


_CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}


def _time(call, args, repeats: int, clock: Callable[[], float]) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = clock()
    jax.block_until_ready(call(*args))
    best = min(best, clock() - start)
  return best


def _calls(names, modes, x, g) -> dict:
  calls = {}
  for name in names:
    ours, twin = getattr(flaxact, name), JAX_NN[name]
    for lib, fn in (('flaxact', ours), ('jax.nn', twin)):
      if fn is None:
        continue
      for mode in modes:
        args = (x,) if mode == 'fwd' else (x, g)
        calls[(lib, name, mode)] = (jax.jit(_BUILD[mode](fn)), args)
  return calls


def _measure(calls: dict, rounds: int, repeats: int, seed: int, clock) -> dict:
  """Per-entry list of per-round times, entries in a fresh order each round."""
  for call, args in calls.values():  # compile and warm up
    _time(call, args, 1, clock)
  times = {key: [] for key in calls}
  keys = list(calls)
  order = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in order.permutation(len(keys)):
      call, args = calls[keys[i]]
      times[keys[i]].append(_time(call, args, repeats, clock))
  return times


def _row(times, name, modes, dtype, size) -> dict:
  row = {'dtype': jnp.dtype(dtype).name, 'size': size, 'activation': name}
  for mode in modes:
    ours = times[('flaxact', name, mode)]
    relu = times[('flaxact', 'relu', mode)]
    row[f'{mode}_ms'] = min(ours) * 1e3
    row[f'{mode}_vs_relu'] = min(ours) / min(relu)
    theirs = times.get(('jax.nn', name, mode))
    if theirs is None:
      continue
    per_round = np.asarray(ours) / np.asarray(theirs)
    row[f'{mode}_jax_nn_ms'] = min(theirs) * 1e3
    row[f'{mode}_vs_jax_nn'] = min(ours) / min(theirs)
    row[f'{mode}_vs_jax_nn_median'] = float(statistics.median(per_round))
    row[f'{mode}_vs_jax_nn_p10'] = float(np.percentile(per_round, 10))
    row[f'{mode}_vs_jax_nn_p90'] = float(np.percentile(per_round, 90))
  return row


def run(
  sizes, dtypes, names, modes, rounds: int, repeats: int, clock: str = 'wall'
) -> list[dict]:
  """Times the named activations (and relu); returns one row per name."""
  names = ['relu'] + [n for n in names if n != 'relu']
  rows = []
  for size in sizes:
    for dtype in dtypes:
      key_x, key_g = jax.random.split(jax.random.key(0))
      x = (jax.random.normal(key_x, (size,), jnp.float32) * 3).astype(dtype)
      g = jax.random.normal(key_g, (size,), jnp.float32).astype(dtype)
      calls = _calls(names, modes, x, g)
      times = _measure(calls, rounds, repeats, size, _CLOCKS[clock])
      rows += [_row(times, n, modes, dtype, size) for n in names]
  return rows


def _fmt(value) -> str:
  return '-' if value is None else f'{value:.2f}'


def print_table(rows: list[dict], modes) -> None:
  """Prints the rows as a markdown table of time ratios."""
  head = ['size', 'dtype', 'activation']
  for mode in modes:
    head += [
      f'{mode} / relu',
      f'{mode} / jax.nn (min)',
      f'{mode} / jax.nn (median [p10, p90])',
    ]
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for r in rows:
    cells = [
      f'2^{int(r["size"]).bit_length() - 1}',
      r['dtype'],
      r['activation'],
    ]
    for mode in modes:
      median = r.get(f'{mode}_vs_jax_nn_median')
      spread = '-'
      if median is not None:
        lo, hi = r[f'{mode}_vs_jax_nn_p10'], r[f'{mode}_vs_jax_nn_p90']
        spread = f'{median:.2f} [{lo:.2f}, {hi:.2f}]'
      cells += [
        _fmt(r[f'{mode}_vs_relu']),
        _fmt(r.get(f'{mode}_vs_jax_nn')),
        spread,
      ]
    print('| ' + ' | '.join(cells) + ' |')


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--sizes',
    default=str(1 << 23),
    help='comma-separated elements per array (default 2**23)',
  )
  parser.add_argument(
    '--dtypes',
    default='float32,bfloat16',
    help='comma-separated dtypes (default float32,bfloat16)',
  )
  parser.add_argument(
    '--only',
    default=','.join(JAX_NN),
    help='comma-separated activations (default: all; relu always runs)',
  )
  parser.add_argument(
    '--modes',
    default=','.join(MODES),
    help=f'comma-separated subset of {",".join(MODES)} (default all)',
  )
  parser.add_argument(
    '--rounds', type=int, default=15, help='interleaved rounds (default 15)'
  )
  parser.add_argument(
    '--repeats',
    type=int,
    default=1,
    help='timed calls per entry and round, minimum kept (default 1)',
  )
  parser.add_argument(
    '--clock',
    choices=sorted(_CLOCKS),
    default='wall',
    help='wall: elapsed time; process: CPU time of all threads (default wall)',
  )
  parser.add_argument(
    '--json', metavar='PATH', help='also write the figures to this JSON file'
  )
  args = parser.parse_args(argv)
  modes = args.modes.split(',')
  names = args.only.split(',')
  for value, valid, what in ((modes, MODES, 'mode'), (names, JAX_NN, 'name')):
    unknown = sorted(set(value) - set(valid))
    if unknown:
      parser.error(f'unknown {what} {unknown}; expected some of {list(valid)}')
  return args, names, modes


def main(argv=None) -> None:
  args, names, modes = _parse(argv)
  sizes = [int(s) for s in args.sizes.split(',')]
  dtypes = [jnp.dtype(d) for d in args.dtypes.split(',')]
  rows = run(sizes, dtypes, names, modes, args.rounds, args.repeats, args.clock)
  cpu = platform.processor() or platform.machine()
  print(
    f'# {args.rounds} interleaved rounds x {args.repeats} call(s), order'
    f' shuffled each round; {args.clock} clock;'
    f' jax {jax.__version__},'
    f' {jax.devices()[0].platform}, {cpu}'
  )
  print_table(rows, modes)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'sizes': sizes,
          'rounds': args.rounds,
          'repeats': args.repeats,
          'clock': args.clock,
          'jax': jax.__version__,
          'device': str(jax.devices()[0]),
          'rows': rows,
        },
        f,
        indent=2,
      )


if __name__ == '__main__':
  main()
