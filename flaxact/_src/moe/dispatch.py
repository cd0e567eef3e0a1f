"""Dispatch and combine of routed FFNs: the sorted layout and its VJP.

Tokens are sorted once by expert (a stable ``argsort`` of the flat expert
ids, so each expert's rows stay in token order). Each expert's rows are then
padded to a multiple of ``tile`` rows (``tile=1``: unpadded, for
``lax.ragged_dot``). Everything that moves rows is a gather with ``O(T·k)``
integer metadata: the dispatch gathers token rows into the layout, the
combine gathers each assignment's output row and sums over ``k``, and each
one's transpose is a gather by the inverse index. No scatter of activations
and no one-hot matrix is ever built.

With ``capacity`` each expert keeps its first ``capacity`` assignments in
token order; the rest are dropped (reported in ``dropped``), as are
assignments to the sentinel expert ``num_experts``.

:func:`experts_ffn` is one ``jax.custom_vjp``: its backward pass keeps ``x``,
the routing weights, the integer layout and the two hidden-sized
pre-activations (tagged ``'moe_gate'`` and ``'moe_up'`` for remat policies),
and recomputes the weighted hidden activation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import core as jax_core
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.common.interception import without_qwix_interception
from flaxact._src.moe.experts import fake_quant, fused_loop
from flaxact._src.moe.experts import grouped as gm
from flaxact._src.moe.experts.grouped import take
from flaxact._src.moe.experts.quantized import QuantizedKernel

Array = jax.Array

#: Checkpoint name of the experts' gate pre-activations, ``(rows, hidden)``.
GATE = 'moe_gate'
#: Checkpoint name of the experts' up projections, ``(rows, hidden)``.
UP = 'moe_up'
#: Checkpoint name of the routing results: the router logits ``(T, E)``,
#: the top-k weights and experts ``(T, k)`` and the sorted layout's integer
#: arrays (the ``MoE`` layers save them so that their remat does not run the
#: router and the sort again in the backward pass).
ROUTING = 'moe_routing'
#: The ``jax.checkpoint`` policy that keeps only the two of them.
MOE_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(GATE, UP)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=(
    'sizes',
    'row_expert',
    'tile_expert',
    'tiles_used',
    'row_assign',
    'assign_row',
    'dropped',
  ),
  meta_fields=('tile',),
)
@dataclasses.dataclass(frozen=True)
class Layout:
  """Where every assignment's row lives; all integer arrays.

  Attributes:
    tile: rows per tile (1: unpadded).
    sizes: ``(E,)`` rows kept per expert.
    row_expert: ``(R,)`` each row's expert (clipped to ``[0, E)``).
    tile_expert: ``(R // tile,)`` each tile's expert.
    tiles_used: ``()`` tiles holding rows, in front.
    row_assign: ``(R,)`` flat assignment index of each row, ``T·k`` if empty.
    assign_row: ``(T, k)`` row of each assignment, ``R`` if dropped.
    dropped: ``(T, k)`` bool, assignments dropped.
  """

  tile: int
  sizes: Array
  row_expert: Array
  tile_expert: Array
  tiles_used: Array
  row_assign: Array
  assign_row: Array
  dropped: Array


def num_rows(n: int, num_experts: int, tile: int, capacity: int | None):
  """The static number of layout rows for ``n`` assignments."""
  kept = n if capacity is None else jax_core.min_dim(n, num_experts * capacity)
  if tile == 1:
    return kept
  return (kept + num_experts * (tile - 1)) // tile * tile


def make_layout(
  experts: Array, num_experts: int, tile: int, capacity: int | None = None
) -> Layout:
  """Sorts assignments by expert into (padded) groups of rows.

  Args:
    experts: ``(T, k)`` int expert ids in ``[0, num_experts]``; the id
      ``num_experts`` means not routed (dropped).
    num_experts: ``E``.
    tile: pad each expert's rows to a multiple of this.
    capacity: keep at most this many assignments per expert, in token order.

  Returns:
    The :class:`Layout`.
  """
  t, k = experts.shape
  n, e = t * k, num_experts
  flat = experts.reshape(n).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  counts = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  inv = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  clipped = jnp.minimum(flat, e - 1)
  rank = inv - starts[clipped]
  kept = flat < e
  sizes = counts
  if capacity is not None:
    kept &= rank < capacity
    sizes = jnp.minimum(counts, capacity)
  padded = (sizes + tile - 1) // tile * tile
  pend = jnp.cumsum(padded)
  pstart = pend - padded
  r = num_rows(n, e, tile, capacity)
  assign_row = jnp.where(kept, pstart[clipped] + rank, r)
  rows = jnp.arange(r, dtype=jnp.int32)
  row_e = jnp.searchsorted(pend, rows, side='right').astype(jnp.int32)
  row_expert = jnp.minimum(row_e, e - 1)
  row_rank = rows - pstart[row_expert]
  valid = (row_e < e) & (row_rank < sizes[row_expert])
  src = jnp.clip(starts[row_expert] + row_rank, 0, n - 1)
  row_assign = jnp.where(valid, order[src], n)
  return Layout(
    tile=tile,
    sizes=sizes,
    row_expert=row_expert,
    tile_expert=row_expert[::tile],
    tiles_used=pend[-1] // tile,
    row_assign=row_assign,
    assign_row=assign_row.reshape(t, k),
    dropped=~kept.reshape(t, k),
  )


def combine(out, assign_row):
  """Sums each token's k output rows ``out[assign_row]``: ``(T, d)``."""
  t, k = assign_row.shape
  return take(out, assign_row.reshape(-1)).reshape(t, k, -1).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _experts(impl, prod, precision, x, w, layout, kernels, biases):
  return _experts_fwd(impl, prod, precision, x, w, layout, kernels, biases)[0]


def _quantizes_itself(prod, kernels) -> bool:
  """QAT settings or PTQ kernels: the matmuls quantize by themselves."""
  return isinstance(prod, fake_quant.QatProduct) or any(
    isinstance(k, QuantizedKernel) for k in kernels
  )


def _own(fn):
  """``fn`` with Qwix's interception off when it quantizes by itself.

  The custom VJP's rules may be traced after the layer's call has left its
  own no-interception scope (under ``jax.grad`` with remat), so each rule
  turns it off again.
  """

  @functools.wraps(fn)
  def run(impl, prod, precision, *args):
    kernels = args[3] if fn is _experts_fwd else args[0][5]
    if _quantizes_itself(prod, kernels):
      return without_qwix_interception(fn)(impl, prod, precision, *args)
    return fn(impl, prod, precision, *args)

  return run


def _experts_fwd(impl, prod, precision, x, w, layout, kernels, biases):
  k = layout.assign_row.shape[1]
  # Under QAT the forward pass runs on quantized kernels; the residuals
  # keep the original ones for the backward pass (Qwix's default).
  fwd_kernels = fake_quant.forward_kernels(prod, kernels)
  if impl == 'loop':
    y, g, u = fused_loop.forward(
      prod, layout, k, x, w.reshape(-1), fwd_kernels, biases, precision
    )
    g, u = checkpoint_name(g, GATE), checkpoint_name(u, UP)
    return y, (x, w, layout, g, u, kernels, biases)
  xr = take(x, layout.row_assign // k)
  wr = take(w.reshape(-1), layout.row_assign)
  out, g, u = gm.grouped_forward(
    impl, prod, layout, xr, wr, fwd_kernels, biases, precision
  )
  g, u = checkpoint_name(g, GATE), checkpoint_name(u, UP)
  y = combine(out, layout.assign_row)
  return y, (x, w, layout, g, u, kernels, biases)


def _experts_bwd(impl, prod, precision, res, dy):
  x, w, layout, g, u, kernels, biases = res
  k = layout.assign_row.shape[1]
  if impl == 'loop':
    dx, dw, dk, db = fused_loop.backward(
      prod, layout, k, x, w.reshape(-1), g, u, kernels, biases, dy, precision
    )
    dw = dw.reshape(w.shape)
  else:
    token = layout.row_assign // k
    xr, wr = take(x, token), take(w.reshape(-1), layout.row_assign)
    dout = take(dy, token)
    dxr, dwr, dk, db = gm.grouped_backward(
      impl, prod, layout, (xr, wr, g, u), kernels, biases, dout, precision
    )
    dx = combine(dxr, layout.assign_row).astype(x.dtype)
    dw = take(dwr, layout.assign_row.reshape(-1)).reshape(w.shape)
  dk = tuple(
    q.zero_cotangent() if isinstance(q, QuantizedKernel) else d
    for d, q in zip(dk, kernels, strict=True)
  )
  dk = jax.tree.map(_sum_to_vma, dk, kernels)
  db = jax.tree.map(_sum_to_vma, db, biases)
  return _sum_to_vma(dx, x), _sum_to_vma(dw.astype(w.dtype), w), None, dk, db


def _sum_to_vma(ct, primal):
  """Sums ``ct`` over the mesh axes it varies over and ``primal`` does not.

  Inside ``shard_map`` a kernel replicated over ``'data'`` gets one partial
  gradient per data shard; they add up (what shard_map's own transpose does).
  """
  if ct.dtype == jax.dtypes.float0:  # a quantized kernel's int values
    return ct
  extra = gm.varying(ct) - gm.varying(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


_experts.defvjp(_own(_experts_fwd), _own(_experts_bwd))


def experts_ffn(
  x: Array,
  weights: Array,
  layout: Layout,
  kernels: tuple[Array, Array, Array],
  biases: tuple[Any, Any, Any] = (None, None, None),
  *,
  impl: str,
  gated_product: gm.Product,
  precision: Any = None,
  lean: bool = True,
) -> Array:
  """``sum_j weights[t, j] * FFN_{e_j}(x[t])`` over the kept assignments.

  Args:
    x: ``(T, d)`` tokens.
    weights: ``(T, k)`` routing weights (zero where dropped is fine).
    layout: from :func:`make_layout` with ``tile=1`` for ``'ragged'`` and
      ``'tokamax'``.
    kernels: gate ``(E, d, h)``, up ``(E, d, h)``, down ``(E, h, d_out)``,
      in the dtype of ``x``, or a
      :class:`~flaxact._src.moe.experts.quantized.QuantizedKernel` each
      (int8 values and scales; no gradient reaches them).
    biases: ``(E, h)``, ``(E, h)``, ``(E, d_out)`` or ``None`` each.
    impl: ``'loop'``, ``'tiles'``, ``'ragged'`` or ``'tokamax'``.
    gated_product: ``(gate, up) -> hidden``, element-wise.
    precision: matmul precision.
    lean: run under the custom VJP (the lean backward); ``False``: plain
      autodiff of the forward (forward-mode and any order; needs an impl
      autodiff can transpose, ``'tiles'`` or ``'ragged'``).

  Returns:
    ``(T, d_out)`` in the dtype of ``x``.
  """
  if not lean:
    args = (impl, gated_product, precision, x, weights, layout)
    return _experts_fwd(*args, kernels, biases)[0]
  return _experts(
    impl, gated_product, precision, x, weights, layout, kernels, biases
  )
