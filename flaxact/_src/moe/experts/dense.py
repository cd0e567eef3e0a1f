"""The routed experts as plain ``dot_general`` calls: the ``'dense'`` impl.

Each expert projection is ONE ``dot_general`` whose right operand is the
whole stacked ``(E, in, out)`` kernel, experts as the batch axis, as in a
hand-written MoE::

  rows = x broadcast to (T, E, d)     # every token a row of every expert
  gate = dot_general(rows, G)         # (T, E, d) x (E, d, h) -> (E, T, h)
  up   = dot_general(rows, U)         # (E, T, h)
  hid  = where(w > 0, prod(gate, up) * w, 0)   # w: (T, E) routing weights
  out  = dot_general(hid^T, D)        # (T, E, h) x (E, h, o) -> (E, T, o)
  y    = sum_E out

With a ``capacity`` ``C`` below ``T`` the rows are each expert's ``C``
slots instead, ``(C, E, d)``, filled with its kept assignments in token
order (``C·E`` rows in place of ``T·E``).

Quantization libraries see each projection as they see any dense layer's
matmul: Qwix finds the kernel among the module's parameters (PTQ stores it
quantized, QAT fake-quantizes it, LoRA adds a per-expert adapter
``(E, in, r)`` x ``(E, r, out)``, as PEFT gives each expert ``Linear`` its
own) and quantizes per expert and output channel, and per row for the
activations (its defaults: every non-contracting axis is a channel; static
scales average over the rows, axis 0); an AQT ``dot_general`` hook gets the
same call. Plain autodiff gives the backward pass, so a quantizer's own VJP
(straight-through) holds.

Dropless, it costs ``E / k`` times the FLOPs of the grouped impls (with a
capacity factor ``c``, about ``c`` times); with remat the backward pass
keeps the two ``(E, rows, h)`` pre-activations (tagged ``'moe_gate'`` and
``'moe_up'``). The ``MoE`` layers pick it by themselves when a quantizer
needs it (see :func:`flaxact._src.moe.routing_step.resolve_impl`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.moe.dispatch import GATE, UP
from flaxact._src.moe.experts.grouped import take

Array = jax.Array
#: ``project(x, bias_scale=None) -> y``: one expert projection (see
#: :func:`project`), bound to its kernel, bias and hook.
Projector = Callable[..., Array]


#: ``(rows, E, in) x (E, in, out) -> (E, rows, out)``: experts as the batch.
DIMS = (((2,), (1,)), ((1,), (0,)))


def expert_rank(experts: Array, num_experts: int) -> Array:
  """Each assignment's place among its expert's, in token order.

  Args:
    experts: ``(n,)`` expert of each assignment, flattened in token order.
    num_experts: ``E``.

  Returns:
    ``(n,)`` int32: how many earlier assignments chose the same expert
    (what a capacity ``C`` compares with: ``rank < C`` is kept).
  """
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)
  return (jnp.cumsum(one_hot, 0) * one_hot).sum(1) - 1


def project(
  x: Array,
  kernel: Any,
  bias: Any,
  *,
  precision: Any = None,
  dot_general: Callable[..., Array] | None = None,
  bias_scale: Array | None = None,
) -> Array:
  """Every expert's projection of its rows with one ``dot_general``.

  ``x`` of shape ``(rows, E, in)`` holds each expert's input rows along
  axis 1; with ``kernel`` ``(E, in, out)`` (experts as the batch axis) the
  result is ``(E, rows, out)``, plus ``bias`` ``(E, out)``, times
  ``bias_scale`` ``(E, rows)`` (the routing weights) when given.

  Args:
    x: ``(rows, E, in)``, already promoted to the compute dtype.
    kernel: the stacked kernel (a quantization library may hand a quantized
      array through).
    bias: ``(E, out)`` or ``None``.
    precision: passed to ``dot_general``.
    dot_general: a :func:`jax.lax.dot_general` replacement; ``None`` looks
      up ``jax.lax.dot_general`` at call time (so Qwix sees the call).
    bias_scale: ``(E, rows)`` weights of the bias.

  Returns:
    ``(E, rows, out)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> project(jnp.ones((5, 3, 4)), jnp.ones((3, 4, 8)), None).shape
    (3, 5, 8)
  """
  dot = jax.lax.dot_general if dot_general is None else dot_general
  y = dot(x, kernel, DIMS, precision=precision)
  if bias is not None:
    b = jnp.asarray(bias).astype(y.dtype)[:, None, :]
    if bias_scale is not None:
      b = bias_scale.astype(y.dtype)[..., None] * b
    y = y + b
  return y


def experts_rows(
  rows: Array,
  weights: Array,
  projections: tuple[Projector, Projector, Projector],
  gated_product: Callable[[Array, Array], Array],
) -> Array:
  """The weighted expert FFN of each expert's rows: ``(E, rows, out)``.

  Args:
    rows: ``(R, E, d)``: row ``r`` of expert ``e`` at ``[r, e]``.
    weights: ``(R, E)`` routing weight of each row (0: no token there).
    projections: gate, up and down: each ``project(a, bias_scale=None)``
      (see :func:`project`).
    gated_product: ``(gate, up) -> hidden``, element-wise.
  """
  gate, up, down = projections
  g = checkpoint_name(gate(rows), GATE)  # (E, R, h)
  u = checkpoint_name(up(rows), UP)
  w = weights.T
  wh = w.astype(g.dtype)[..., None]
  # Empty rows are masked, not just weighted by zero: an overflow there
  # (inf * 0) must not reach y. The product's inputs are masked too, so
  # the backward pass never multiplies a zero cotangent by an overflow.
  used = wh != 0
  g_, u_ = jnp.where(used, g, 0), jnp.where(used, u, 0)
  hid = jnp.where(used, gated_product(g_, u_) * wh, 0).astype(g.dtype)
  # Back to rows first, so a quantizer's per-row statistics average over
  # rows (its batch axis 0), not over experts.
  return down(jnp.swapaxes(hid, 0, 1), bias_scale=w)


def experts_ffn(
  x: Array,
  weights: Array,
  experts: Array,
  dropped: Array,
  projections: tuple[Projector, Projector, Projector],
  gated_product: Callable[[Array, Array], Array],
  *,
  num_experts: int,
  capacity: int | None,
) -> Array:
  """``sum_j weights[t, j] * FFN_{experts[t, j]}(x[t])`` over kept ones.

  Without a capacity (or one of at least ``T``) every token is a row of
  every expert, ``(T, E, d)``, the routing weights zero where an expert
  was not chosen. With ``capacity`` ``C < T`` each expert's kept
  assignments fill its ``C`` slots in token order, ``(C, E, d)``: ``C·E``
  rows instead of ``T·E``.

  Args:
    x: ``(T, d)`` tokens in the compute dtype.
    weights: ``(T, k)`` routing weights.
    experts: ``(T, k)`` chosen experts.
    dropped: ``(T, k)`` bool, assignments over capacity.
    projections: gate, up and down (see :func:`project`).
    gated_product: ``(gate, up) -> hidden``, element-wise.
    num_experts: ``E``.
    capacity: ``C`` or ``None`` (dropless).

  Returns:
    ``(T, out)`` in the dtype of the projections.
  """
  t, k = experts.shape
  e, n = num_experts, t * k
  kept = jnp.where(dropped, 0.0, weights)
  symbolic = jax.export.is_symbolic_dim
  if (
    capacity is None
    or capacity == t
    or (not symbolic(capacity) and not symbolic(t) and capacity >= t)
  ):
    one_hot = jax.nn.one_hot(experts, e, dtype=kept.dtype)
    # A sum of products, not an einsum: a quantizer intercepting matmuls
    # must not round the routing weights.
    combine = (one_hot * kept[..., None]).sum(1)
    rows = jnp.broadcast_to(x[:, None, :], (t, e, x.shape[-1]))
    return experts_rows(rows, combine, projections, gated_product).sum(0)
  c: Any = capacity  # an int, or a symbolic dimension under jax.export
  flat = experts.reshape(n)
  ok = ~dropped.reshape(n)
  rank = expert_rank(flat, e)
  grid = jnp.where(ok, rank * e + flat, c * e)
  assign = jnp.full((c * e,), n, jnp.int32)
  assign = assign.at[grid].set(jnp.arange(n, dtype=jnp.int32), mode='drop')
  rows = take(x, assign // k).reshape(c, e, -1)
  row_w = take(kept.reshape(n), assign).reshape(c, e)
  out = experts_rows(rows, row_w, projections, gated_product)  # (E, C, o)
  pick = jnp.where(ok, flat * c + rank, c * e)
  return take(out.reshape(c * e, -1), pick).reshape(t, k, -1).sum(1)
