"""The token exchange of expert parallelism: who sends which rows where.

Inside :func:`jax.shard_map` each device holds ``T`` tokens, ``n = T·k``
assignments, and ``ep`` peers along the expert axis, peer ``p`` holding
experts ``[p·E/ep, (p+1)·E/ep)``. Each device may send at most ``budget``
rows to each peer: its first ``budget`` assignments to that peer in token
order; the rest are dropped (counted, their weights zeroed). The receiving
side always sees one ``(ep, budget)`` block of rows per peer, its valid rows
first, so the experts' computation is the same whichever exchange ran:

- :func:`padded_exchange`: :func:`jax.lax.all_to_all` of the whole
  ``(ep, budget, ·)`` blocks, padding included: bytes moved per direction
  ``ep · budget`` rows per device. Runs on every backend.
- :func:`ragged_exchange`: one small ``all_to_all`` of the per-peer counts,
  then :func:`jax.lax.ragged_all_to_all` of the valid rows only: bytes moved
  proportional to the rows routed. It lowers (and exports) for GPU and TPU;
  XLA:CPU does not implement ``ragged-all-to-all`` and cannot compile it.

The budget (:func:`peer_budget`): ``ceil(ep_capacity_factor · T·k / ep)``
rows, or, dropless (``None``), every assignment (``T · min(k, E/ep)``, the
worst case: all of a device's assignments go to one peer).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxact._src.moe.experts import grouped as gm

Array = jax.Array


def check_ep_capacity_factor(value) -> float | None:
  """``value`` as a float, or ``None`` (dropless).

  Raises:
    TypeError: for a value that is not a real number or ``None``.
    ValueError: for a value that is not positive.
  """
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
      'ep_capacity_factor must be a positive number or None (dropless);'
      f' got {value!r}.'
    )
  if not float(value) > 0:
    raise ValueError(
      'ep_capacity_factor must be positive (or None for dropless); got'
      f' {value}.'
    )
  return float(value)


def peer_budget(
  ep_capacity_factor: float | None, tokens: int, k: int, num_local: int, ep: int
) -> int:
  """Rows one device may send to each peer.

  ``ceil(ep_capacity_factor · tokens · k / ep)``, at least 1 and at most
  ``tokens · min(k, num_local)`` (what one peer can receive at most: its
  ``num_local`` experts take one assignment per token each); that bound
  when ``ep_capacity_factor`` is ``None`` (dropless).
  """
  most = max(1, tokens * min(k, num_local))
  if ep_capacity_factor is None:
    return most
  return min(most, max(1, math.ceil(ep_capacity_factor * tokens * k / ep)))


class Packing(NamedTuple):
  """Where a device's assignments go (``n = T·k`` of them, ``ep`` peers).

  Attributes:
    order: ``(n,)`` assignments sorted by destination peer, token order
      within each peer (unrouted ones last).
    counts: ``(ep,)`` assignments to each peer (before the budget).
    starts: ``(ep,)`` where each peer's assignments start in ``order``.
    rank: ``(n,)`` each assignment's place among its peer's, in token order.
    kept: ``(T, k)`` bool, routed and within the budget.
    send: ``(ep, budget)`` flat assignment of each send slot, ``n`` if empty.
  """

  order: Array
  counts: Array
  starts: Array
  rank: Array
  kept: Array
  send: Array


def pack(experts: Array, num_local: int, ep: int, budget: int) -> Packing:
  """Assigns each of a device's assignments its peer and send slot.

  Args:
    experts: ``(T, k)`` expert ids; ``E = ep · num_local`` (or more) means
      not routed.
    num_local: experts per peer.
    ep: peers.
    budget: rows each peer may receive from this device.
  """
  t, k = experts.shape
  n = t * k
  flat = experts.reshape(n)
  dest = jnp.minimum(flat // num_local, ep)  # ep: not routed
  order = jnp.argsort(dest, stable=True).astype(jnp.int32)
  counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)
  starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
  inv = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  rank = inv - starts[jnp.minimum(dest, ep - 1)]
  kept = (dest < ep) & (rank < budget)
  slot = jnp.arange(budget, dtype=jnp.int32)
  src = jnp.clip(starts[:, None] + slot[None, :], 0, n - 1)
  valid = slot[None, :] < jnp.minimum(counts, budget)[:, None]
  send = jnp.where(valid, order[src], n)
  return Packing(order, counts, starts, rank, kept.reshape(t, k), send)


def _local_ids(experts: Array, idx: Array, num_local: int) -> Array:
  """Local expert of assignments ``idx`` (``num_local`` where out of range)."""
  flat = experts.reshape(-1)
  n = flat.shape[0]
  return jnp.where(
    idx < n, flat[jnp.minimum(idx, n - 1)] % num_local, num_local
  ).astype(jnp.int32)


class Received(NamedTuple):
  """The rows a device got, ``(ep · budget, ·)``: peer ``p``'s at ``p``."""

  x: Array
  w: Array
  local_expert: Array  # num_local for an empty slot


def padded_exchange(x, w, experts, p: Packing, *, num_local, axis):
  """Sends every ``(ep, budget)`` block whole, padding included.

  Returns what arrived (:class:`Received`) and the function that sends the
  experts' output rows back, ``(T, k, d_out)`` (zeros where dropped).
  """
  t, k = experts.shape
  ep, budget = p.send.shape
  a2a = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)
  send_x = gm.take(x, p.send // k)
  send_w = gm.take(w.reshape(-1), p.send)
  send_e = _local_ids(experts, p.send, num_local)
  got = Received(
    a2a(send_x).reshape(ep * budget, -1),
    a2a(send_w).reshape(ep * budget),
    a2a(send_e).reshape(ep * budget),
  )
  flat = experts.reshape(-1)
  dest = jnp.minimum(flat // num_local, ep - 1)
  back_row = jnp.where(p.kept.reshape(-1), dest * budget + p.rank, ep * budget)

  def send_back(y):
    back = a2a(y.reshape(ep, budget, -1)).reshape(ep * budget, -1)
    return gm.take(back, back_row).reshape(t, k, -1)

  return got, send_back


def ragged_exchange(x, w, experts, p: Packing, *, num_local, axis):
  """As :func:`padded_exchange`, moving only the valid rows.

  The sorted assignments are one ``(n, ·)`` operand; peer ``q`` receives this
  device's first ``min(counts[q], budget)`` rows for it at offset
  ``me · budget`` of its ``(ep · budget, ·)`` buffer. The output goes back
  to where each row came from in the sender's sorted operand (the peers'
  ``starts``, exchanged with the counts).
  """
  t, k = experts.shape
  n = t * k
  ep, budget = p.send.shape
  sizes = jnp.minimum(p.counts, budget).astype(jnp.int32)
  # One small exchange: what each peer sends me, and where it came from.
  meta = jax.lax.all_to_all(
    jnp.stack([sizes, p.starts], 1), axis, 0, 0, tiled=True
  )
  recv_sizes, peer_starts = meta[:, 0], meta[:, 1]
  me = jax.lax.axis_index(axis).astype(jnp.int32)
  slots = jnp.arange(ep, dtype=jnp.int32) * budget

  def ragged(a, fill):
    out = gm.varying_zeros((ep * budget, *a.shape[1:]), a.dtype, a) + fill
    return jax.lax.ragged_all_to_all(
      a,
      out,
      p.starts,
      sizes,
      jnp.full((ep,), me * budget, jnp.int32),
      recv_sizes,
      axis_name=axis,
    )

  got = Received(
    ragged(gm.take(x, p.order // k), 0),
    ragged(gm.take(w.reshape(-1), p.order), 0),
    ragged(_local_ids(experts, p.order, num_local), num_local),
  )
  inv = (
    jnp.zeros((n,), jnp.int32).at[p.order].set(jnp.arange(n, dtype=jnp.int32))
  )
  back_row = jnp.where(p.kept.reshape(-1), inv, n)

  def send_back(y):
    out = gm.varying_zeros((n, y.shape[-1]), y.dtype, y)
    back = jax.lax.ragged_all_to_all(
      y, out, slots, recv_sizes, peer_starts, sizes, axis_name=axis
    )
    return gm.take(back, back_row).reshape(t, k, -1)

  return got, send_back


#: The exchanges by name (``'auto'``: :func:`choose_exchange`).
EXCHANGES = {'padded': padded_exchange, 'ragged': ragged_exchange}


def choose_exchange(exchange: str) -> str:
  """``'ragged'`` on GPU and TPU, ``'padded'`` on CPU, for ``'auto'``.

  Raises:
    ValueError: for a name other than ``'auto'``, ``'padded'``, ``'ragged'``.
  """
  if exchange == 'auto':
    return 'padded' if jax.default_backend() == 'cpu' else 'ragged'
  if exchange not in EXCHANGES:
    raise ValueError(
      f"exchange must be 'auto', 'padded' or 'ragged'; got {exchange!r}."
    )
  return exchange
