"""Expert parallelism: tokens move to the experts' devices, weights stay.

The stacked expert kernels are split along their experts axis over one mesh
axis (``'expert'``): each device holds ``E / ep`` experts. Tokens are split
over every other mesh axis too. Inside :func:`jax.shard_map` each device
packs its assignments per destination peer (at most a budget of rows each,
:mod:`flaxact._src.moe.experts.exchange`), exchanges them (``all_to_all``
of padded blocks, or ``ragged_all_to_all`` of the routed rows on GPU and
TPU), runs its local experts on the rows it received
(:func:`flaxact._src.moe.dispatch.experts_ffn`, the same impls as one
device), sends the outputs back the same way and combines them. No expert
kernel is ever gathered; the kernels' gradients stay sharded as the kernels
are.

With a ``tensor_axis`` (``'mlp'`` on ``'model'``) each device also holds
only its slice of every local expert's hidden axis (gate/up column-split,
down row-split); the devices of one ``'model'`` group hold the same tokens,
exchange them alike, compute partial outputs and add them with one ``psum``.

``ep_capacity_factor=None`` (dropless) sizes the per-peer budget for the
worst case (every local assignment to one peer): ``ep`` times the routed
rows in the buffers, and in the bytes the padded exchange moves; the
``'loop'`` impl computes only the rows that arrived, so the padding costs
memory and bandwidth, not FLOPs. A factor bounds both, dropping overflow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import exchange as xc
from flaxact._src.moe.experts.api import tile_rows

Array = jax.Array


def _local(x, w, experts, kernels, biases, *, cfg):
  """One device's share: pack, exchange, run the local experts, send back."""
  ep, axis, tensor = cfg.ep, cfg.axis, cfg.tensor_axis
  t, k = experts.shape
  num_local = kernels[0].shape[0]
  budget = xc.peer_budget(cfg.ep_capacity_factor, t, k, num_local, ep)
  p = xc.pack(experts, num_local, ep, budget)
  got, send_back = xc.EXCHANGES[cfg.exchange](
    x, w, experts, p, num_local=num_local, axis=axis
  )
  rows = got.x.shape[0]
  # ~t·k/num_local rows per local expert: ep peers send t·k/E_global each
  tile = tile_rows(cfg.tile_size, cfg.impl, t * k, num_local)
  layout = dispatch.make_layout(
    got.local_expert.reshape(rows, 1), num_local, tile
  )
  if tensor is not None and biases[2] is not None:
    # Each 'model' shard adds its partial down projection; the bias once.
    first = jax.lax.axis_index(tensor) == 0
    biases = (*biases[:2], jnp.where(first, biases[2], 0))
  y = dispatch.experts_ffn(
    got.x,
    got.w.reshape(rows, 1),
    layout,
    kernels,
    biases,
    impl=cfg.impl,
    gated_product=cfg.prod,
    precision=cfg.precision,
    lean=cfg.lean,
  )
  out = send_back(y).sum(1)
  if tensor is not None:  # the one reduction of tensor-parallel experts
    out = jax.lax.psum(out, tensor)
  dropped = (experts < ep * num_local) & ~p.kept
  return out, dropped, dropped.sum(dtype=jnp.int32)[None]


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static settings of one device's share (see :func:`_local`)."""

  ep: int
  axis: str
  tensor_axis: str | None
  ep_capacity_factor: float | None
  exchange: str
  impl: str
  prod: Any
  precision: Any
  tile_size: int | None
  lean: bool


class ParallelResult(NamedTuple):
  """What :func:`expert_parallel_ffn` returns.

  Attributes:
    y: ``(T, d_out)`` the routed experts' output.
    dropped: ``(T, k)`` bool, assignments the exchange dropped (over the
      per-peer budget of ``ep_capacity_factor``).
    dropped_per_device: ``(S,)`` int32, those drops per token shard (the
      ``S`` devices the tokens are split over, in mesh order).
  """

  y: Array
  dropped: Array
  dropped_per_device: Array


def expert_parallel_ffn(
  x: Array,
  weights: Array,
  experts: Array,
  kernels: tuple[Array, Array, Array],
  biases: tuple[Any, Any, Any],
  *,
  mesh: jax.sharding.Mesh,
  expert_axis: str = 'expert',
  tensor_axis: str | None = None,
  ep_capacity_factor: float | None = None,
  exchange: str = 'auto',
  impl: str,
  gated_product: Any,
  precision: Any = None,
  tile_size: int | None = None,
  lean: bool = True,
) -> ParallelResult:
  """The routed experts of ``(T, d)`` tokens, experts sharded over a mesh axis.

  Args:
    x: ``(T, d)`` tokens; padded to a multiple of the token shards inside
      (the padding routed to no expert, and sliced off the output).
    weights: ``(T, k)`` routing weights (zero for dropped assignments).
    experts: ``(T, k)`` expert ids; ``num_experts`` marks a dropped one.
    kernels: gate ``(E, d, h)``, up ``(E, d, h)``, down ``(E, h, d_out)``.
    biases: ``(E, h)``, ``(E, h)``, ``(E, d_out)`` or ``None`` each.
    mesh: the device mesh; tokens are split over all of its axes but
      ``tensor_axis``.
    expert_axis: the mesh axis the experts axis is split over.
    tensor_axis: a mesh axis the experts' hidden axis is split over
      (tensor-parallel experts: gate/up column-split, down row-split, one
      ``psum`` of the output over it), or ``None``.
    ep_capacity_factor: each device sends at most
      ``ceil(ep_capacity_factor · T_local · k / ep)`` rows to each peer,
      dropping the overflow in token order; ``None``: dropless, with
      buffers for the worst case (``T_local · min(k, E/ep)`` rows per peer:
      ``ep`` times the routed rows, in memory and, with the padded exchange,
      in bytes moved).
    exchange: ``'padded'`` (``all_to_all`` of whole per-peer blocks),
      ``'ragged'`` (``ragged_all_to_all`` of the routed rows; not on CPU) or
      ``'auto'`` (ragged on GPU and TPU, padded on CPU).
    impl: the grouped-matmul impl each device runs.
    gated_product: ``(gate, up) -> hidden``.
    precision: matmul precision.
    tile_size: rows per tile (``'loop'``, ``'tiles'``); ``None``: from the
      local shape (:func:`flaxact._src.moe.experts.api.tile_rows`).
    lean: the experts' custom VJP (see
      :func:`flaxact._src.moe.dispatch.experts_ffn`).

  Returns:
    The :class:`ParallelResult`; ``y`` in the dtype of ``x``.

  Raises:
    ValueError: if the mesh has no ``expert_axis`` (or ``tensor_axis``), or
      the experts (or the hidden width) do not divide evenly over it.
  """
  for name in (expert_axis, tensor_axis):
    if name is not None and name not in mesh.axis_names:
      raise ValueError(
        f'expert parallelism needs a mesh axis {name!r}; the mesh has'
        f' {tuple(mesh.axis_names)}.'
      )
  ep = mesh.shape[expert_axis]
  e = kernels[0].shape[0]
  if e % ep:
    raise ValueError(
      f'expert parallelism over {ep} devices needs num_experts divisible by'
      f' {ep}; got {e} experts.'
    )
  if tensor_axis is not None and kernels[0].shape[-1] % mesh.shape[tensor_axis]:
    raise ValueError(
      f'tensor-parallel experts over {mesh.shape[tensor_axis]} devices need'
      f' a hidden width divisible by it; got {kernels[0].shape[-1]}.'
    )
  t = experts.shape[0]
  others = [a for a in mesh.axis_names if a not in (expert_axis, tensor_axis)]
  token_axes = (*others, expert_axis)
  shards = math.prod(mesh.shape[a] for a in token_axes)
  pad = -t % shards  # padding tokens: no expert (the id E), dropped after
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=e)
  tokens = P(token_axes)  # tokens split over every mesh axis but the tensor
  mlp = tensor_axis
  kernel_specs = (
    P(expert_axis, None, mlp),
    P(expert_axis, None, mlp),
    P(expert_axis, mlp, None),
  )
  bias_specs = (P(expert_axis, mlp), P(expert_axis, mlp), P(expert_axis))
  cfg = _Config(
    ep=ep,
    axis=expert_axis,
    tensor_axis=tensor_axis,
    ep_capacity_factor=xc.check_ep_capacity_factor(ep_capacity_factor),
    exchange=xc.choose_exchange(exchange),
    impl=impl,
    prod=gated_product,
    precision=precision,
    tile_size=tile_size,
    lean=lean,
  )
  fn = jax.shard_map(
    functools.partial(_local, cfg=cfg),
    mesh=mesh,
    in_specs=(
      tokens,
      tokens,
      tokens,
      kernel_specs,
      tuple(
        None if b is None else s
        for b, s in zip(biases, bias_specs, strict=True)
      ),
    ),
    out_specs=(tokens, tokens, tokens),
  )
  # The padded tokens split over an explicit mesh (jax.reshard takes only
  # Explicit axes; under Auto axes shard_map reshards its inputs itself).
  if _explicit(mesh):
    x, weights, experts = (
      jax.reshard(a, jax.sharding.NamedSharding(mesh, tokens))
      for a in (x, weights, experts)
    )
  y, dropped, per_device = fn(x, weights, experts, kernels, biases)
  if pad and _explicit(mesh):  # t rows cannot stay split over the mesh
    y, dropped = (
      jax.reshard(a, jax.sharding.NamedSharding(mesh, P()))
      for a in (y, dropped)
    )
  return ParallelResult(y[:t], dropped[:t], per_device)


def _explicit(mesh) -> bool:
  explicit = jax.sharding.AxisType.Explicit
  return any(a == explicit for a in getattr(mesh, 'axis_types', ()))
