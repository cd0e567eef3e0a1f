"""Expert parallelism: tokens move to the experts' devices, weights stay.

The stacked expert kernels are split along their experts axis over one mesh
axis (``'expert'``): each device holds ``E / ep`` experts. Tokens are split
over every mesh axis. Inside :func:`jax.shard_map` each device sorts its own
assignments by expert, packs them per destination device into a
``(ep, T_local * k, d)`` buffer and exchanges it with one
:func:`jax.lax.all_to_all`; each device runs its local experts on the rows
it received (:func:`flaxact._src.moe.dispatch.experts_ffn`, the same impls as
one device), sends the outputs back with a second ``all_to_all`` and
combines them. No expert kernel is ever gathered; the kernels' gradients
stay sharded as the kernels are.

The buffers are sized for the worst case (every local assignment to one
device), so the exchange is dropless; the ``'loop'`` impl computes only the
rows that arrived, so the padding costs memory and bandwidth, not FLOPs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import grouped as gm

Array = jax.Array


def _pack(x, w, experts, num_local, ep):
  """Sorts local assignments by destination; returns buffers and indices."""
  t, k = experts.shape
  n = t * k
  flat = experts.reshape(n)
  dest = jnp.minimum(flat // num_local, ep)  # ep: dropped
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  slot = jnp.arange(n, dtype=jnp.int32)
  src = jnp.clip(starts[:, None] + slot[None, :], 0, n - 1)  # (ep, n)
  valid = slot[None, :] < counts[:, None]
  assign = jnp.where(valid, order[src], n)  # (ep, n) flat assignment or n
  local_e = jnp.where(
    valid, flat[jnp.minimum(assign, n - 1)] % num_local, num_local
  )
  send_x = gm.take(x, assign // k)
  send_w = gm.take(w.reshape(n), assign)
  inv = jnp.zeros((n,), jnp.int32).at[order].set(slot)
  clipped = jnp.minimum(dest, ep - 1)
  back_row = jnp.where(dest < ep, clipped * n + inv - starts[clipped], ep * n)
  return send_x, send_w, local_e, back_row.reshape(t, k)


def _local(
  x,
  w,
  experts,
  kernels,
  biases,
  *,
  axis,
  ep,
  impl,
  prod,
  precision,
  tile,
  lean,
):
  num_local = kernels[0].shape[0]
  send_x, send_w, local_e, back_row = _pack(x, w, experts, num_local, ep)
  a2a = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)
  recv_x, recv_w, recv_e = a2a(send_x), a2a(send_w), a2a(local_e)
  rows = recv_x.shape[0] * recv_x.shape[1]
  layout = dispatch.make_layout(recv_e.reshape(rows, 1), num_local, tile)
  y = dispatch.experts_ffn(
    recv_x.reshape(rows, -1),
    recv_w.reshape(rows, 1),
    layout,
    kernels,
    biases,
    impl=impl,
    gated_product=prod,
    precision=precision,
    lean=lean,
  )
  back = a2a(y.reshape(ep, -1, y.shape[-1])).reshape(rows, -1)
  return dispatch.combine(back, back_row)


def expert_parallel_ffn(
  x: Array,
  weights: Array,
  experts: Array,
  kernels: tuple[Array, Array, Array],
  biases: tuple[Any, Any, Any],
  *,
  mesh: jax.sharding.Mesh,
  expert_axis: str = 'expert',
  impl: str,
  gated_product: Any,
  precision: Any = None,
  tile_size: int = 128,
  lean: bool = True,
) -> Array:
  """The routed experts of ``(T, d)`` tokens, experts sharded over a mesh axis.

  Args:
    x: ``(T, d)`` tokens; padded to a multiple of the mesh size inside (the
      padding routed to no expert, and sliced off the output).
    weights: ``(T, k)`` routing weights (zero for dropped assignments).
    experts: ``(T, k)`` expert ids; ``num_experts`` marks a dropped one.
    kernels: gate ``(E, d, h)``, up ``(E, d, h)``, down ``(E, h, d_out)``.
    biases: ``(E, h)``, ``(E, h)``, ``(E, d_out)`` or ``None`` each.
    mesh: the device mesh; tokens are split over all of its axes.
    expert_axis: the mesh axis the experts axis is split over.
    impl: the grouped-matmul impl each device runs.
    gated_product: ``(gate, up) -> hidden``.
    precision: matmul precision.
    tile_size: rows per tile (``'loop'``, ``'tiles'``).
    lean: the experts' custom VJP (see
      :func:`flaxact._src.moe.dispatch.experts_ffn`).

  Returns:
    ``(T, d_out)`` in the dtype of ``x``.

  Raises:
    ValueError: if the mesh has no ``expert_axis``, or the experts do not
      divide evenly over it.
  """
  if expert_axis not in mesh.axis_names:
    raise ValueError(
      f'expert parallelism needs a mesh axis {expert_axis!r}; the mesh has'
      f' {tuple(mesh.axis_names)}.'
    )
  ep = mesh.shape[expert_axis]
  e = kernels[0].shape[0]
  if e % ep:
    raise ValueError(
      f'expert parallelism over {ep} devices needs num_experts divisible by'
      f' {ep}; got {e} experts.'
    )
  t = x.shape[0]
  pad = -t % mesh.size  # padding tokens: no expert (the id E), dropped after
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=e)
  others = [a for a in mesh.axis_names if a != expert_axis]
  tokens = P((*others, expert_axis))  # tokens split over every mesh axis
  shard = lambda a: None if a is None else P(expert_axis)
  tile = 1 if impl in gm.RAGGED_IMPLS else int(tile_size)

  def body(x, w, ex, kernels, biases):
    return _local(
      x,
      w,
      ex,
      kernels,
      biases,
      axis=expert_axis,
      ep=ep,
      impl=impl,
      prod=gated_product,
      precision=precision,
      tile=tile,
      lean=lean,
    )

  fn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(
      tokens,
      tokens,
      tokens,
      tuple(map(shard, kernels)),
      tuple(map(shard, biases)),
    ),
    out_specs=tokens,
  )
  if pad or _explicit(mesh):  # the padded tokens: split over the mesh
    x, weights, experts = (
      jax.reshard(a, jax.sharding.NamedSharding(mesh, tokens))
      for a in (x, weights, experts)
    )
  y = fn(x, weights, experts, kernels, biases)
  if pad and _explicit(mesh):  # t rows cannot stay split over the mesh
    y = jax.reshard(y, jax.sharding.NamedSharding(mesh, P()))
  return y[:t]


def _explicit(mesh) -> bool:
  explicit = jax.sharding.AxisType.Explicit
  return any(a == explicit for a in getattr(mesh, 'axis_types', ()))
