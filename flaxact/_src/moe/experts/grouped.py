"""The expert FFN over rows grouped by expert: three grouped-matmul impls.

Rows arrive sorted by expert (:mod:`flaxact._src.moe.dispatch` builds the
layout). Each impl supplies the same small set of grouped operations, and one
forward and one backward body written against them computes the gated expert
FFN, so every impl runs the same arithmetic in the same order:

- ``'ragged'``: :func:`jax.lax.ragged_dot` on the unpadded sorted rows (and
  ``ragged_dot_general`` for the weight gradients). The portable grouped
  matmul, lowered to fast grouped kernels on GPU and TPU; on CPU XLA
  computes it as one masked dense matmul per expert (``E`` times the FLOPs).
- ``'tokamax'``: the same on the unpadded sorted rows, through
  ``tokamax.ragged_dot`` / ``ragged_dot_general`` (an optional dependency:
  Pallas grouped-GEMM kernels on GPU and TPU, its XLA path elsewhere).
- ``'tiles'``: each expert's rows padded to a multiple of ``tile`` rows; one
  batched matmul over the tiles with each tile's expert kernel gathered.
  One big op per matmul; the gathered kernels cost memory traffic.
- ``'loop'``: the same padded tiles, visited by a loop over the tiles in
  use (the full ones, then each partial tile's rows in smaller blocks:
  ``fused_loop.block_sizes``); each step is a dense matmul with
  the tile's expert kernel read in place (:class:`DenseOps`), with the
  dispatch and combine fused into the tiles
  (:mod:`flaxact._src.moe.experts.fused_loop`). The fastest on CPU
  (measured in ``benchmarks/moe.py``).

The backward pass keeps the gate and up pre-activations only and recomputes
the weighted hidden activation from them.

A kernel may be a :class:`~flaxact._src.moe.experts.quantized.QuantizedKernel`
(int8 values and per-expert, per-channel scales, a Qwix PTQ model's): each
operation dequantizes the expert kernels it reads (one expert's in
``'loop'``, the tiles' gathered int8 in ``'tiles'``); the ragged impls
dequantize the stacked kernel for the call. Its cotangent is zero.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxact._src.moe.experts import fake_quant
from flaxact._src.moe.experts.quantized import dense_weight, expert_weight

Array = jax.Array
#: The impls on unpadded rows (``tile=1`` layouts).
RAGGED_IMPLS = ('ragged', 'tokamax')
Product = Callable[[Array, Array], Array]


def take(a, idx):
  """Rows ``a[idx]`` along axis 0; an out-of-range index gives zeros."""
  return jnp.take(a, idx, axis=0, mode='fill', fill_value=0)


def _dot(a, b, precision, contract=((1,), (0,)), batch=((), ())):
  return jax.lax.dot_general(a, b, (contract, batch), precision=precision)


#: ``(rows, in) x (rows, out) -> (E, in, out)``, rows ragged by expert.
WGRAD_DIMS = jax.lax.RaggedDotDimensionNumbers(
  dot_dimension_numbers=(((0,), (0,)), ((), ())),
  lhs_ragged_dimensions=[0],
  rhs_group_dimensions=[],
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged_wgrad(a, b, sizes, precision):
  """``(E, ·, ·)``: ``a_g^T b_g`` over each group ``g`` of sorted rows.

  ``lax.ragged_dot_general`` in its ragged-contracting mode, whose
  transpose JAX does not implement; its VJP here is two ``ragged_dot``
  calls, so the weight gradients of ``'ragged'`` can be differentiated
  again (grad of grad with respect to the kernels).
  """
  return jax.lax.ragged_dot_general(
    a, b, sizes, WGRAD_DIMS, precision=precision
  )


def _ragged_wgrad_fwd(a, b, sizes, precision):
  return _ragged_wgrad(a, b, sizes, precision), (a, b, sizes)


def _ragged_wgrad_bwd(precision, res, ct):
  a, b, sizes = res
  mm = functools.partial(jax.lax.ragged_dot, group_sizes=sizes)
  da = mm(b, jnp.swapaxes(ct, 1, 2).astype(b.dtype), precision=precision)
  db = mm(a, ct.astype(a.dtype), precision=precision)
  return da.astype(a.dtype), db.astype(b.dtype), None


_ragged_wgrad.defvjp(_ragged_wgrad_fwd, _ragged_wgrad_bwd)


@dataclasses.dataclass(frozen=True)
class RaggedOps:
  """Grouped operations on unpadded sorted rows (``lax.ragged_dot``)."""

  sizes: Array  # (E,) rows per expert; rows past their sum are empty
  row_expert: Array  # (R,) expert of each row, clipped to [0, E)
  precision: Any

  def mm(self, a, w):
    return jax.lax.ragged_dot(
      a, dense_weight(w), self.sizes, precision=self.precision
    )

  def mm_t(self, a, w):
    return self.mm(a, jnp.swapaxes(dense_weight(w), 1, 2))

  def wgrad(self, a, b):
    return _ragged_wgrad(a, b, self.sizes, self.precision)

  def bias(self, b):
    return jnp.take(b, self.row_expert, axis=0)

  def bias_grad(self, db, num_experts):
    valid = jnp.arange(db.shape[0]) < self.sizes.sum()
    db = jnp.where(valid[:, None], db, 0)
    return jax.ops.segment_sum(
      db, self.row_expert, num_experts, indices_are_sorted=True
    )


def _tokamax():
  """The optional ``tokamax`` module (``resolve_impl`` checked it is here)."""
  return importlib.import_module('tokamax')


@dataclasses.dataclass(frozen=True)
class TokamaxOps(RaggedOps):
  """:class:`RaggedOps` through ``tokamax.ragged_dot(_general)``."""

  def mm(self, a, w):
    return _tokamax().ragged_dot(
      a, dense_weight(w), self.sizes, precision=self.precision
    )

  def wgrad(self, a, b):
    return _tokamax().ragged_dot_general(
      a, b, self.sizes, WGRAD_DIMS, precision=self.precision
    )


def ragged_ops(impl, layout, precision) -> RaggedOps:
  """The unpadded-rows operations of ``'ragged'`` or ``'tokamax'``."""
  cls = TokamaxOps if impl == 'tokamax' else RaggedOps
  return cls(layout.sizes, layout.row_expert, precision)


@dataclasses.dataclass(frozen=True)
class TileOps:
  """Grouped operations on ``(tiles, tile, ·)`` blocks, kernels gathered."""

  tile_expert: Array  # (num_tiles,)
  num_experts: int
  precision: Any

  def mm(self, a, w):
    return _dot(
      a, w[self.tile_expert], self.precision, ((2,), (1,)), ((0,),) * 2
    )

  def mm_t(self, a, w):
    return _dot(
      a, w[self.tile_expert], self.precision, ((2,), (2,)), ((0,),) * 2
    )

  def wgrad(self, a, b):
    per_tile = _dot(a, b, self.precision, ((1,), (1,)), ((0,), (0,)))
    return jax.ops.segment_sum(
      per_tile, self.tile_expert, self.num_experts, indices_are_sorted=True
    )

  def bias(self, b):
    return b[self.tile_expert][:, None, :]

  def bias_grad(self, db, num_experts):
    return jax.ops.segment_sum(
      db.sum(1), self.tile_expert, num_experts, indices_are_sorted=True
    )


@dataclasses.dataclass(frozen=True)
class DenseOps:
  """Plain matmuls with one expert's kernels (one tile of ``'loop'``)."""

  expert: Array  # () the tile's expert
  precision: Any

  def _w(self, w):
    return expert_weight(w, self.expert)

  def mm(self, a, w):
    return _dot(a, self._w(w), self.precision)

  def mm_t(self, a, w):
    return _dot(a, self._w(w), self.precision, ((1,), (1,)))

  def wgrad(self, a, b):
    return _dot(a, b, self.precision, ((0,), (0,)))

  def bias(self, b):
    return self._w(b)[None]

  def bias_grad(self, db, num_experts):
    del num_experts
    return db.sum(0)


def _weighted(prod: Product, g, u, w):
  return prod(g, u) * w[..., None].astype(g.dtype)


def ffn_forward(ops, prod: Product, x, w, kernels, biases):
  """The expert FFN on grouped rows: ``(out, gate, up)``.

  ``out = (prod(gate, up) * w) @ down (+ w * down_bias)`` with ``gate`` and
  ``up`` the grouped projections of ``x``; the routing weight ``w`` of each
  row is applied to the hidden activation, so the combine is a plain sum.
  Under QAT (``prod`` a ``fake_quant.QatProduct``) each matmul's rows are
  quantized per row first; the backward pass uses the original rows
  (Qwix's default residuals).
  """
  wg, wu, wd = kernels
  bg, bu, bd = biases
  qg, qu, qd = fake_quant.act_quantizers(prod)  # identity but under QAT
  g = ops.mm(qg(x), wg)
  u = ops.mm(qu(x), wu)
  if bg is not None:
    g = g + ops.bias(bg)
  if bu is not None:
    u = u + ops.bias(bu)
  out = ops.mm(qd(_weighted(prod, g, u, w)), wd)
  if bd is not None:
    out = out + w[..., None].astype(out.dtype) * ops.bias(bd)
  return out, g, u


def ffn_backward(ops, prod: Product, x, w, g, u, kernels, biases, dout):
  """Cotangents ``(dx, dw, dkernels, dbiases)`` of :func:`ffn_forward`."""
  wg, wu, wd = kernels
  bg, bu, bd = biases
  num_experts = wg.shape[0]
  extra = varying(g) - varying(w)
  if extra:  # tensor-parallel experts: w's cotangent summed once, by caller
    w = jax.lax.pcast(w, tuple(sorted(extra)), to='varying')
  hw, pull = jax.vjp(lambda g, u, w: _weighted(prod, g, u, w), g, u, w)
  dh = ops.mm_t(dout, wd)
  d_wd = ops.wgrad(hw, dout)
  dg, du, dw = pull(dh)
  d_bd = None
  if bd is not None:
    b_rows = ops.bias(bd)
    dw = dw + jnp.sum(dout * b_rows, -1).astype(dw.dtype)
    d_bd = ops.bias_grad(dout * w[..., None].astype(dout.dtype), num_experts)
  dx = ops.mm_t(dg, wg) + ops.mm_t(du, wu)
  d_kernels = (ops.wgrad(x, dg), ops.wgrad(x, du), d_wd)
  d_bg = None if bg is None else ops.bias_grad(dg, num_experts)
  d_bu = None if bu is None else ops.bias_grad(du, num_experts)
  return dx, dw, d_kernels, (d_bg, d_bu, d_bd)


def varying(a) -> frozenset:
  """The mesh axes ``a`` varies over inside ``shard_map`` (empty outside)."""
  mat = getattr(jax.typeof(a), 'manual_axis_type', None)
  return frozenset(getattr(mat, 'varying', ()))


def varying_zeros(shape, dtype, *like):
  """Zeros that vary over the mesh axes any of ``like`` varies over.

  Inside ``shard_map`` a loop carry must keep its type; a fresh ``zeros``
  is replicated while the values written into it vary per device.
  """
  z = jnp.zeros(shape, dtype)
  vma = set().union(*(varying(a) for a in like))
  return jax.lax.pcast(z, tuple(sorted(vma)), to='varying') if vma else z


def _tiles(a, tile):
  return a.reshape(a.shape[0] // tile, tile, *a.shape[1:])


def _rows(a):
  return a.reshape(-1, *a.shape[2:])


def grouped_forward(impl, prod, layout, x, w, kernels, biases, precision):
  """``(out, gate, up)`` over all rows: the ragged impls or ``'tiles'``."""
  if impl in RAGGED_IMPLS:
    ops = ragged_ops(impl, layout, precision)
    return ffn_forward(ops, prod, x, w, kernels, biases)
  ops = TileOps(layout.tile_expert, kernels[0].shape[0], precision)
  t = layout.tile
  out = ffn_forward(ops, prod, _tiles(x, t), _tiles(w, t), kernels, biases)
  return tuple(map(_rows, out))


def grouped_backward(impl, prod, layout, res, kernels, biases, dout, precision):
  """``(dx, dw, dkernels, dbiases)`` over all rows (not ``'loop'``)."""
  x, w, g, u = res
  if impl in RAGGED_IMPLS:
    ops = ragged_ops(impl, layout, precision)
    return ffn_backward(ops, prod, x, w, g, u, kernels, biases, dout)
  ops = TileOps(layout.tile_expert, kernels[0].shape[0], precision)
  t = layout.tile
  xt, wt, gt, ut = (_tiles(a, t) for a in (x, w, g, u))
  dx, dw, dk, db = ffn_backward(
    ops, prod, xt, wt, gt, ut, kernels, biases, _tiles(dout, t)
  )
  return _rows(dx), _rows(dw), dk, db
