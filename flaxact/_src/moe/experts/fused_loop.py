"""The ``'loop'`` impl with dispatch and combine fused into its tiles.

The row-wise impls (:mod:`flaxact._src.moe.experts.grouped`) take rows that
the dispatch has already gathered into the sorted layout and leave outputs
for the combine to gather back: each of those is a ``(rows, d)`` array
written to memory and read again, in the forward pass and again in the
backward. Here each tile of ``'loop'`` gathers its own token rows (and
routing weights, and output cotangents) straight from the ``(T, d)``
arrays, and adds its weighted outputs (and input cotangents) into a
``(T, d)`` accumulator in place: no ``(rows, d)`` array exists, only the
gate and up pre-activations that the backward pass keeps.

Each expert's rows fill whole tiles except its last tile. The loop visits
the full tiles first, then the partial tiles' rows in blocks
(:func:`block_sizes`): for tiles of 256 rows or more, half a tile, a
quarter, ... down to 32 rows, each where it fits; a quarter tile for smaller
tiles: an expert with ``n`` rows
computes ``n`` rounded up to a multiple of the smallest block instead of the
tile (on the fine-grained shape of ``benchmarks/moe.py``, 512 rows per
expert, the padding falls from about 12% of the rows to about 3%), and most
of its last tile's rows still run in large matmuls. Padding rows stay zero
in the saved pre-activations.

Sums over a token's ``k`` experts run in visit order instead of expert-slot
order, so results equal the row-wise impls' to rounding (summed in float32
for half-precision inputs, then rounded once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxact._src.moe.experts import grouped as gm

Array = jax.Array


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def block_sizes(tile: int) -> tuple[int, ...]:
  """Block sizes a partial tile is split into, largest first.

  A tile of 256 rows or more: half a tile, a quarter, ... down to 32 rows
  (``(128, 64, 32)`` for 256). A smaller tile: ``tile // 4`` rows alone
  (each block size is a loop of its own in the forward and the backward
  pass, which costs compile time where the matmuls are small). Empty (no
  splitting) for a tile under 16 rows or not a multiple of 4.
  """
  if tile % 4 or tile < 16:
    return ()
  if tile < 256:
    return (tile // 4,)
  sizes, s = [], tile
  while s % 2 == 0 and s // 2 >= 32:
    s //= 2
    sizes.append(s)
  return tuple(sizes)


def visits(layout, n: int, num_experts: int):
  """The passes of the loop: ``[(rows, starts, experts, count), ...]``.

  Each pass visits ``count`` blocks of ``rows`` rows starting at ``starts``
  (static length) with expert ``experts``: the full tiles, then the partial
  tiles' rows in blocks of :func:`block_sizes` -- one block of each larger
  size that fits what is left of the tile's valid rows, largest first, and
  the rest in blocks of the smallest size (so at most ``smallest - 1``
  padding rows per partial tile). Valid rows lead every tile (each
  expert's region starts on a tile boundary), so a tile's valid count
  tells which blocks it needs.

  Args:
    layout: the padded sorted layout.
    n: the number of assignments (``T * k``); ``row_assign == n`` is empty.
    num_experts: ``E``.
  """
  tile = layout.tile
  nt = layout.row_assign.shape[0] // tile
  cnt = jnp.sum(layout.row_assign.reshape(nt, tile) < n, axis=1)
  sizes = block_sizes(tile)
  if not sizes:
    starts = jnp.arange(nt, dtype=jnp.int32) * tile
    return [(tile, starts, layout.tile_expert, layout.tiles_used)]
  full = cnt == tile
  ids = jnp.nonzero(full, size=nt, fill_value=0)[0].astype(jnp.int32)
  passes = [(tile, ids * tile, layout.tile_expert[ids], jnp.sum(full))]
  partial = min(nt, num_experts)  # at most one partial tile per expert
  rem = jnp.where(full, 0, cnt).astype(jnp.int32)  # rows not yet visited
  off = jnp.zeros_like(rem)  # where they start in their tile
  for size in sizes[:-1]:
    take = rem >= size
    ids = jnp.nonzero(take, size=partial, fill_value=0)[0].astype(jnp.int32)
    starts = ids * tile + off[ids]
    passes.append((size, starts, layout.tile_expert[ids], jnp.sum(take)))
    off, rem = off + size * take, rem - size * take
  sub = sizes[-1]  # the rest: fewer than 2 * sub rows, or than a tile
  chunks = (rem + sub - 1) // sub
  end = jnp.cumsum(chunks)
  per_tile = 2 if len(sizes) > 1 else tile // sub
  j = jnp.arange(partial * per_tile, dtype=jnp.int32)
  t = jnp.minimum(jnp.searchsorted(end, j, side='right'), nt - 1)
  at = j - (end[t] - chunks[t])
  starts = t * tile + off[t] + at * sub
  passes.append((sub, starts, layout.tile_expert[t], end[-1]))
  return passes


def fori_used(count, num: int, body, init):
  """``body(i, carry)`` for ``i < count``, as a loop of static trip count.

  The trip count is ``num``, the steps past ``count`` skipped with
  ``cond``: a static count keeps the loop reverse-differentiable (a
  ``scan``), which second-order autodiff through the backward pass needs.
  """

  def step(i, carry):
    return jax.lax.cond(i < count, body, lambda i, carry: carry, i, carry)

  return jax.lax.fori_loop(0, num, step, init)


def forward(prod, layout, k, x, w, kernels, biases, precision):
  """``(y, gate, up)``: ``y`` the ``(T, d_out)`` combined output.

  Args:
    prod: the gated product.
    layout: the padded sorted layout (``tile`` rows per tile).
    k: assignments per token.
    x: ``(T, d)`` tokens.
    w: ``(T * k,)`` routing weights, zero where dropped.
    kernels: the stacked expert kernels.
    biases: the stacked expert biases (``None`` each where absent).
    precision: matmul precision.
  """
  t, n = x.shape[0], w.shape[0]
  r, h = layout.row_assign.shape[0], kernels[0].shape[-1]
  like = (x, w, *jax.tree.leaves(kernels))
  carry = (
    gm.varying_zeros((t, kernels[2].shape[-1]), _acc_dtype(x.dtype), *like),
    gm.varying_zeros((r, h), x.dtype, *like),
    gm.varying_zeros((r, h), x.dtype, *like),
  )
  for size, starts, experts, count in visits(layout, n, kernels[0].shape[0]):

    def body(i, carry, size=size, starts=starts, experts=experts):
      y, gs, us = carry
      at = starts[i]
      rows = jax.lax.dynamic_slice_in_dim(layout.row_assign, at, size)
      token = rows // k  # T (out of range) for an empty row
      ops = gm.DenseOps(experts[i], precision)
      xs, ws = gm.take(x, token), gm.take(w, rows)
      out, g, u = gm.ffn_forward(ops, prod, xs, ws, kernels, biases)
      y = y.at[token].add(out.astype(y.dtype), mode='drop')
      put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, at, 0)
      return y, put(gs, g), put(us, u)

    carry = fori_used(count, starts.shape[0], body, carry)
  y, g, u = carry
  return y.astype(x.dtype), g, u


def backward(prod, layout, k, x, w, g, u, kernels, biases, dy, precision):
  """``(dx, dw, dkernels, dbiases)`` of :func:`forward`, ``dw`` ``(T * k,)``."""
  like = (x, w, g, dy, *jax.tree.leaves(kernels))
  zeros = lambda a: (
    None if a is None else gm.varying_zeros(a.shape, a.dtype, *like)
  )
  carry = (
    gm.varying_zeros(x.shape, _acc_dtype(x.dtype), *like),
    gm.varying_zeros(w.shape, _acc_dtype(w.dtype), *like),
    tuple(map(zeros, kernels)),
    tuple(map(zeros, biases)),
  )
  for size, starts, experts, count in visits(
    layout, w.shape[0], kernels[0].shape[0]
  ):

    def body(i, carry, size=size, starts=starts, experts=experts):
      dx, dw, dk, db = carry
      e, at = experts[i], starts[i]
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, at, size)
      rows = sl(layout.row_assign)
      token = rows // k
      args = (
        gm.take(x, token),
        gm.take(w, rows),
        sl(g),
        sl(u),
        kernels,
        biases,
      )
      dxs, dws, dks, dbs = gm.ffn_backward(
        gm.DenseOps(e, precision), prod, *args, gm.take(dy, token)
      )
      add = lambda a, v: None if a is None else a.at[e].add(v)
      return (
        dx.at[token].add(dxs.astype(dx.dtype), mode='drop'),
        dw.at[rows].add(dws.astype(dw.dtype), mode='drop'),
        tuple(map(add, dk, dks)),
        tuple(map(add, db, dbs)),
      )

    carry = fori_used(count, starts.shape[0], body, carry)
  dx, dw, dk, db = carry
  return dx.astype(x.dtype), dw.astype(w.dtype), dk, db
