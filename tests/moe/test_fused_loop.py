"""The ``'loop'`` impl's visits: every routed row once, in blocks that fit.

:func:`fused_loop.visits` plans which blocks of rows the loop computes: the
full tiles, then each partial tile's rows in blocks of
:func:`fused_loop.block_sizes`. Checked on layouts of skewed, balanced,
capped and empty routings: every valid row is visited exactly once, no
block leaves its tile or mixes experts, and at most ``smallest - 1``
padding rows are computed per partial tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import fused_loop


@pytest.mark.parametrize(
  ('tile', 'sizes'),
  [
    (8, ()),
    (12, ()),
    (16, (4,)),
    (64, (16,)),
    (128, (32,)),
    (256, (128, 64, 32)),
    (512, (256, 128, 64, 32)),
    (384, (192, 96, 48)),
  ],
)
def test_block_sizes(tile, sizes):
  assert fused_loop.block_sizes(tile) == sizes


E = 8


def _routings():
  rng = np.random.default_rng(0)
  t, k, e = 200, 4, E
  balanced = np.stack([rng.permutation(e)[:k] for _ in range(t)])
  skewed = np.stack(
    [
      rng.choice(e, k, replace=False, p=np.arange(1, e + 1) / 36)
      for _ in range(t)
    ]
  )
  one_hot = np.zeros((t, k), np.int32) + np.arange(k)  # experts 0..k-1 only
  dropped = np.where(rng.random((t, k)) < 0.3, e, balanced)  # id e: dropped
  return {
    'balanced': (balanced, None),
    'skewed': (skewed, None),
    'few_experts': (one_hot, None),
    'dropped': (dropped, None),
    'capped': (skewed, 37),
  }


@functools.partial(jax.jit, static_argnums=(1, 2))
def _plan(experts, tile, capacity):
  """The layout's rows and the loop's passes (starts, experts, count)."""
  layout = dispatch.make_layout(experts, E, tile, capacity)
  passes = fused_loop.visits(layout, experts.size, E)
  return (
    layout.row_assign,
    layout.row_expert,
    layout.sizes,
    [p[1:] for p in passes],
  )


@pytest.mark.parametrize('tile', [8, 16, 64, 128, 256, 512])
@pytest.mark.parametrize('routing', list(_routings()))
def test_visits_cover_every_row_once(tile, routing):
  experts, capacity = _routings()[routing]
  n = experts.size
  row_assign, row_expert, sizes, passes = jax.tree.map(
    np.asarray, _plan(jnp.asarray(experts), tile, capacity)
  )
  seen = np.zeros(row_assign.shape[0], np.int32)
  padding = 0
  blocks = fused_loop.block_sizes(tile)
  rows = (tile, *blocks) if blocks else (tile,)
  assert len(rows) == len(passes)
  for size, (starts, block_experts, count) in zip(rows, passes, strict=True):
    for i in range(int(count)):
      at = int(starts[i])
      assert at // tile == (at + size - 1) // tile, 'block leaves its tile'
      assert np.all(row_expert[at : at + size] == block_experts[i])
      seen[at : at + size] += 1
      padding += int(np.sum(row_assign[at : at + size] == n))
  valid = row_assign < n
  np.testing.assert_array_equal(seen[valid], 1)
  assert seen.max(initial=0) <= 1
  partial_tiles = int(np.sum(sizes % tile != 0))
  smallest = blocks[-1] if blocks else tile
  assert padding <= partial_tiles * (smallest - 1)
