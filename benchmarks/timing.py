"""The timing method every benchmark here shares.

A published figure is a ratio taken in one run on a quiet machine: rows are
timed in interleaved rounds (order shuffled with a fixed seed each round),
medians and minima are reported, and ``/proc/loadavg`` is read before and
after. Above ``--max-load`` (default 0.5 per core) before the run a script
refuses to start unless ``--allow-busy`` is given, in which case its figures
are marked as taken under load (never to be published).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Mapping


def add_load_args(p: argparse.ArgumentParser) -> None:
  """Adds ``--max-load`` and ``--allow-busy`` to a script's parser."""
  p.add_argument(
    '--max-load',
    type=float,
    default=None,
    help='refuse above this 1-minute load average (default 0.5 per core)',
  )
  p.add_argument(
    '--allow-busy',
    action='store_true',
    help='run above --max-load anyway; figures are marked as under load',
  )


def loadavg() -> tuple[float, float, float]:
  """The 1, 5 and 15-minute load averages (zeros where unknown)."""
  try:
    with open('/proc/loadavg') as f:
      parts = f.read().split()
    return (float(parts[0]), float(parts[1]), float(parts[2]))
  except (OSError, ValueError, IndexError):
    return (0.0, 0.0, 0.0)


def check_quiet(a: argparse.Namespace) -> dict:
  """Refuses (exits non-zero) above ``--max-load`` unless ``--allow-busy``."""
  cores = os.cpu_count() or 1
  limit = a.max_load if a.max_load is not None else 0.5 * cores
  before = loadavg()
  busy = before[0] > limit
  if busy and not a.allow_busy:
    sys.exit(
      f'load average {before[0]:.2f} is above {limit:.2f} ({cores} cores):'
      ' timings would not be publishable. Wait for a quiet machine, or pass'
      ' --allow-busy to run anyway (figures marked as under load).'
    )
  if busy:
    print(
      f'WARNING: load average {before[0]:.2f} > {limit:.2f}: these figures'
      ' are taken under load and must not be published.',
      file=sys.stderr,
    )
  return {'cores': cores, 'limit': limit, 'before': before}


def finish_load(load: dict) -> str:
  """Records the load after the run in ``load``; returns the line to print.

  The run's own threads raise the 1-minute average it ends with: only the
  reading before the run can tell whether the machine was quiet.
  """
  load['after'] = loadavg()
  load['busy'] = load['before'][0] > load['limit']
  return (
    f'load average before {load["before"][0]:.2f}, after'
    f' {load["after"][0]:.2f} (this run included; {load["cores"]} cores)'
    + ('  UNDER LOAD: not publishable' if load['busy'] else '')
  )


def median(ts):
  ts = sorted(ts)
  return ts[len(ts) // 2]


def rounds(
  fns: Mapping[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float, float]]:
  """Median, min and max ms per row over ``repeats`` interleaved rounds.

  Each round runs every row once in an order shuffled with a fixed seed, so
  that no row always follows the same neighbour (a row right after one that
  allocates a lot of memory can pay for it).
  """
  times: dict[str, list[float]] = {name: [] for name in fns}
  order = list(fns)
  rng = random.Random(0)
  for _ in range(repeats):
    rng.shuffle(order)
    for name in order:
      fn = fns[name]
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {
    n: (1e3 * median(ts), 1e3 * min(ts), 1e3 * max(ts))
    for n, ts in times.items()
  }
