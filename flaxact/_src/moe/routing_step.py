"""The routing step of a routed FFN: top-k, capacity, layout and aux.

:func:`route` turns float32 router logits into what every experts impl
needs: the routing weights and experts, the assignments dropped over
capacity, the sorted layout of the grouped impls (``None`` for ``'dense'``
and under expert parallelism, which build their own) and the auxiliary
outputs (:class:`MoEAux`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import dense
from flaxact._src.moe.experts.api import (
  GroupedImplUnderQuantizerWarning as GroupedImplUnderQuantizerWarning,
)
from flaxact._src.moe.experts.api import tile_rows
from flaxact._src.moe.losses import (
  load_balancing_loss,
  router_z_loss,
  sequence_balance_loss,
)
from flaxact._src.moe.settings import RoutingSettings
from flaxact._src.moe.token_mask import route_experts

Array = jax.Array


class MoEAux(NamedTuple):
  """Auxiliary outputs of :func:`moe_ffn` (leading token shape ``...``).

  With a ``token_mask``, masked tokens keep the ``weights`` and ``experts``
  the router chose for them (unused: they reach no expert), are never
  ``dropped`` and count in no load, drop count or loss.

  Attributes:
    router_logits: ``(..., E)`` float32.
    weights: ``(..., k)`` float32 routing weights (before dropping).
    experts: ``(..., k)`` int32 chosen experts.
    dropped: ``(..., k)`` bool, assignments over capacity (an expert's
      ``capacity_factor``, or under expert parallelism a peer's
      ``ep_capacity_factor`` budget).
    expert_load: ``(E,)`` int32 real tokens routed to each expert (before
      dropping).
    dropped_tokens: ``()`` int32 number of dropped assignments (of real
      tokens, in this call).
    load_balancing_loss: float32 scalar (on ``softmax(logits)``).
    router_z_loss: float32 scalar.
    sequence_balance_loss: float32 scalar, :func:`sequence_balance_loss`
      with the router's scores; the sequences are the last token axis
      (``(..., seq)``; a 1-D token shape is one sequence).
    dropped_per_device: ``(S,)`` int32 assignments the expert-parallel
      exchange dropped on each of the ``S`` devices holding tokens (over
      ``ep_capacity_factor``), or ``None`` without expert parallelism.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxact
    >>> E, d, h = 4, 8, 16
    >>> ks = jax.random.split(jax.random.key(0), 5)
    >>> x = jax.random.normal(ks[0], (6, d))
    >>> router = jax.random.normal(ks[1], (d, E))
    >>> gate, up = (jax.random.normal(k, (E, d, h)) for k in ks[2:4])
    >>> down = jax.random.normal(ks[4], (E, h, d))
    >>> moe = jax.jit(flaxact.moe_ffn, static_argnames='experts_per_token')
    >>> y, aux = moe(x, router, gate, up, down, experts_per_token=2)
    >>> aux.experts.shape, int(aux.expert_load.sum())
    ((6, 2), 12)
  """

  router_logits: Array
  weights: Array
  experts: Array
  dropped: Array
  expert_load: Array
  dropped_tokens: Array
  load_balancing_loss: Array
  router_z_loss: Array
  sequence_balance_loss: Array
  dropped_per_device: Array | None = None


def sequences(lead: tuple[int, ...]) -> tuple[int, int]:
  """``(batch, seq)`` of a token shape: the last axis is the sequence.

  ``(T,)`` (and ``()``, one token) is one sequence.
  """
  if not lead:
    return 1, 1
  return math.prod(lead[:-1]), lead[-1]


class Routed(NamedTuple):
  """The result of :func:`route` (``T`` tokens, ``k`` per token).

  Attributes:
    logits: ``(T, E)`` float32 router logits.
    weights: ``(T, k)`` routing weights.
    experts: ``(T, k)`` chosen experts.
    dropped: ``(T, k)`` bool, assignments over capacity (never those of
      masked tokens).
    layout: the sorted layout of a grouped impl, or ``None``.
    capacity: assignments kept per expert, or ``None`` (dropless).
    mask: ``(T,)`` bool token mask (``True``: a real token), or ``None``.
    router: the router's name (for the sequence-wise loss).
    dropped_per_device: ``(S,)`` exchange drops per token shard, or
      ``None``.
  """

  logits: Array
  weights: Array
  experts: Array
  dropped: Array
  layout: dispatch.Layout | None
  capacity: int | None = None
  mask: Array | None = None
  router: str = 'softmax'
  dropped_per_device: Array | None = None

  @property
  def routed_experts(self) -> Array:
    """``(T, k)`` experts, ``E`` (no expert) for masked tokens."""
    return route_experts(self.experts, self.mask, self.logits.shape[-1])

  @property
  def unrouted(self) -> Array:
    """``(T, k)`` bool: assignments that reach no expert."""
    if self.mask is None:
      return self.dropped
    return self.dropped | ~self.mask[:, None]

  @property
  def kept_weights(self) -> Array:
    """``(T, k)`` weights, zero where dropped or masked."""
    return jnp.where(self.unrouted, 0.0, self.weights)

  def dense_ffn(self, x: Array, projections, gated_product) -> Array:
    """The ``'dense'`` experts of ``(T, d)`` tokens ``x``.

    See :func:`flaxact._src.moe.experts.dense.experts_ffn`.
    """
    return dense.experts_ffn(
      x,
      self.weights,
      self.routed_experts,
      self.unrouted,
      projections,
      gated_product,
      num_experts=self.logits.shape[-1],
      capacity=self.capacity,
    )

  def aux(self, lead: tuple[int, ...]) -> MoEAux:
    """The :class:`MoEAux`, token axes reshaped to ``lead``."""
    e, k = self.logits.shape[-1], self.experts.shape[-1]
    m = self.mask
    load = jax.nn.one_hot(self.routed_experts, e, dtype=jnp.int32)
    b, s = sequences(lead)
    seq = sequence_balance_loss(
      self.logits.reshape(b, s, e),
      self.experts.reshape(b, s, k),
      e,
      router=self.router,
      token_mask=None if m is None else m.reshape(b, s),
    )
    return MoEAux(
      router_logits=self.logits.reshape(*lead, e),
      weights=self.weights.reshape(*lead, k),
      experts=self.experts.reshape(*lead, k),
      dropped=self.dropped.reshape(*lead, k),
      expert_load=load.sum((0, 1)),
      dropped_tokens=self.dropped.sum().astype(jnp.int32),
      load_balancing_loss=load_balancing_loss(
        self.logits, self.experts, e, token_mask=m
      ),
      router_z_loss=router_z_loss(self.logits, token_mask=m),
      sequence_balance_loss=seq,
      dropped_per_device=self.dropped_per_device,
    )


def _saved(tree):
  """``tree`` tagged :data:`~flaxact._src.moe.dispatch.ROUTING`."""
  return jax.tree.map(lambda a: checkpoint_name(a, dispatch.ROUTING), tree)


def route(
  logits: Array,
  settings: RoutingSettings,
  *,
  score_correction_bias: Any,
  impl: str,
  mesh: Any,
  token_mask: Array | None = None,
) -> Routed:
  """Top-k routing of ``(T, E)`` logits and, for grouped impls, the layout.

  Masked tokens are routed to no expert: they take no capacity slot (the
  capacity ranks count real tokens only; the capacity itself comes from
  ``T``, every position, a static shape) and are never dropped.

  Args:
    logits: ``(T, E)`` float32.
    settings: the routing options.
    score_correction_bias: ``(E,)`` for the sigmoid router, or ``None``.
    impl: a resolved impl (not ``'auto'``).
    mesh: the expert-parallel mesh or ``None``.
    token_mask: ``(T,)`` bool (``True``: a real token) or ``None``.

  Returns:
    The :class:`Routed`. Under a mesh the layout is left to the devices;
    with ``capacity_factor`` the drops are those of one device (each
    expert keeps its first ``capacity`` assignments in global token order).
  """
  logits = _saved(logits)
  weights, experts = _saved(settings.top_k(logits, score_correction_bias))
  t, k = experts.shape
  e = logits.shape[-1]
  capacity = settings.capacity(tokens=t, num_experts=e)
  none = jnp.zeros((t, k), bool)
  done = functools.partial(
    Routed, logits, weights, experts, mask=token_mask, router=settings.router
  )
  if t == 0:  # no tokens: nothing to lay out (the caller returns zeros)
    return done(none, None)
  routed = route_experts(experts, token_mask, e)  # masked: expert E
  if impl == 'dense' or (mesh is not None and capacity is not None):
    # The same drops as one device, in global token order (under a mesh
    # jit computes the ranks across the token shards).
    dropped = none
    if capacity is not None:
      rank = dense.expert_rank(routed.reshape(-1), e)  # E: rank -1
      dropped = (rank >= capacity).reshape(t, k)
    return done(dropped, None, capacity)
  if mesh is not None:
    return done(none, None)
  tile = tile_rows(settings.tile_size, impl, t * k, e)
  layout = _saved(dispatch.make_layout(routed, e, tile, capacity))
  dropped = layout.dropped  # the sentinel E counts as dropped there
  if token_mask is not None:
    dropped = dropped & token_mask[:, None]
  return done(dropped, layout, capacity)
