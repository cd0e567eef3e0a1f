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

Sums over a token's ``k`` experts run in tile order instead of expert-slot
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
  tile, t = layout.tile, x.shape[0]
  r, h = layout.row_assign.shape[0], kernels[0].shape[-1]
  like = (x, w, *jax.tree.leaves(kernels))
  init = (
    gm.varying_zeros((t, kernels[2].shape[-1]), _acc_dtype(x.dtype), *like),
    gm.varying_zeros((r, h), x.dtype, *like),
    gm.varying_zeros((r, h), x.dtype, *like),
  )

  def body(i, carry):
    y, gs, us = carry
    rows = jax.lax.dynamic_slice_in_dim(layout.row_assign, i * tile, tile)
    token = rows // k  # T (out of range) for an empty row
    ops = gm.DenseOps(layout.tile_expert[i], precision)
    xs, ws = gm.take(x, token), gm.take(w, rows)
    out, g, u = gm.ffn_forward(ops, prod, xs, ws, kernels, biases)
    y = y.at[token].add(out.astype(y.dtype), mode='drop')
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, i * tile, 0)
    return y, put(gs, g), put(us, u)

  y, g, u = gm.fori_used(layout, r // tile, body, init)
  return y.astype(x.dtype), g, u


def backward(prod, layout, k, x, w, g, u, kernels, biases, dy, precision):
  """``(dx, dw, dkernels, dbiases)`` of :func:`forward`, ``dw`` ``(T * k,)``."""
  tile = layout.tile
  like = (x, w, g, dy, *jax.tree.leaves(kernels))
  zeros = lambda a: (
    None if a is None else gm.varying_zeros(a.shape, a.dtype, *like)
  )
  init = (
    gm.varying_zeros(x.shape, _acc_dtype(x.dtype), *like),
    gm.varying_zeros(w.shape, _acc_dtype(w.dtype), *like),
    tuple(map(zeros, kernels)),
    tuple(map(zeros, biases)),
  )

  def body(i, carry):
    dx, dw, dk, db = carry
    e = layout.tile_expert[i]
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * tile, tile)
    rows = sl(layout.row_assign)
    token = rows // k
    args = (gm.take(x, token), gm.take(w, rows), sl(g), sl(u), kernels, biases)
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

  dx, dw, dk, db = gm.fori_used(layout, g.shape[0] // tile, body, init)
  return dx.astype(x.dtype), dw.astype(w.dtype), dk, db
