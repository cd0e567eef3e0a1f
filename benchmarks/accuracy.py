"""Accuracy of flaxact and jax.nn activations against float64 references.

For float32: the maximum relative error on a dense grid over [-30, 30] plus
tails, where |y| >= 1e-6 and where 1e-30 <= |y| < 1e-6. For bfloat16 and
float16: the maximum error in units in the last place (ULP) over every finite
input value of the dtype, where |y| >= 1e-30. The float64 references are the
test suite's (``tests/helpers.py``), so run this from the repository root.

Usage:
  python -m benchmarks.accuracy [--only sigmoid,tanh] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.activations import JAX_NN
from tests import helpers


def _f32_errors(fn, case) -> tuple[float, float]:
  x = np.concatenate(
    [
      np.linspace(-30, 30, 240_001),
      np.logspace(-30, 1.5, 4000),
      -np.logspace(-30, 1.5, 4000),
    ]
  ).astype(np.float32)
  y = np.asarray(jax.jit(fn)(x), np.float64)
  with np.errstate(all='ignore'):
    ref = case.ref(x.astype(np.float64)).astype(np.float32).astype(np.float64)
    err = np.abs(y - ref) / np.abs(ref)
  main = np.isfinite(ref) & (np.abs(ref) >= 1e-6)
  tail = np.isfinite(ref) & (np.abs(ref) >= 1e-30) & ~main
  return float(err[main].max(initial=0)), float(err[tail].max(initial=0))


def _half_ulps(fn, case, dtype) -> int:
  x = helpers.all_finite_values(dtype)
  y = np.asarray(jax.jit(fn)(jnp.asarray(x)))
  with np.errstate(all='ignore'):
    ref = case.ref(x.astype(np.float64)).astype(dtype)
    keep = np.isfinite(ref.astype(np.float64)) & (
      np.abs(ref.astype(np.float64)) >= 1e-30
    )
  ulps = np.abs(helpers.ordered_bits(y) - helpers.ordered_bits(ref))
  return int(ulps[keep].max(initial=0))


def run(names=None) -> list[dict]:
  """Measures the named activations (default: all with a float64 reference)."""
  rows = []
  for name, case in sorted(helpers.CASES.items()):
    if names is not None and name not in names:
      continue
    for lib, fn in (('flaxact', case.fn), ('jax.nn', JAX_NN.get(name))):
      if fn is None:
        continue
      main, tail = _f32_errors(fn, case)
      rows.append(
        {
          'activation': name,
          'library': lib,
          'f32_rel_err': main,
          'f32_rel_err_tail': tail,
          'bf16_max_ulp': _half_ulps(fn, case, jnp.bfloat16),
          'f16_max_ulp': _half_ulps(fn, case, jnp.float16),
        }
      )
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', metavar='PATH', help='write the rows here')
  parser.add_argument(
    '--only', help='comma-separated activations (default: all)'
  )
  args = parser.parse_args(argv)
  rows = run(args.only.split(',') if args.only else None)
  print(
    '| activation | library | f32 max rel err (abs(y) >= 1e-6)'
    ' | f32 max rel err (tail) | bf16 max ULP | f16 max ULP |'
  )
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["activation"]} | {r["library"]} | {r["f32_rel_err"]:.1e}'
      f' | {r["f32_rel_err_tail"]:.1e} | {r["bf16_max_ulp"]}'
      f' | {r["f16_max_ulp"]} |'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
