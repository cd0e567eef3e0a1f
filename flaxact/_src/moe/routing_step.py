"""The routing step of a routed FFN: top-k, capacity, layout and aux.

:func:`route` turns float32 router logits into what every experts impl
needs: the routing weights and experts, the assignments dropped over
capacity, the sorted layout of the grouped impls (``None`` for ``'dense'``
and under expert parallelism, which build their own) and the auxiliary
outputs (:class:`MoEAux`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import dense
from flaxact._src.moe.experts.api import (
  GroupedImplUnderQuantizerWarning as GroupedImplUnderQuantizerWarning,
)
from flaxact._src.moe.experts.grouped import RAGGED_IMPLS
from flaxact._src.moe.routers import load_balancing_loss, router_z_loss
from flaxact._src.moe.settings import RoutingSettings

Array = jax.Array


class MoEAux(NamedTuple):
  """Auxiliary outputs of :func:`moe_ffn` (leading token shape ``...``).

  Attributes:
    router_logits: ``(..., E)`` float32.
    weights: ``(..., k)`` float32 routing weights (before dropping).
    experts: ``(..., k)`` int32 chosen experts.
    dropped: ``(..., k)`` bool, assignments over capacity.
    expert_load: ``(E,)`` int32 tokens routed to each expert (before
      dropping).
    dropped_tokens: ``()`` int32 number of dropped assignments.
    load_balancing_loss: float32 scalar (on ``softmax(logits)``).
    router_z_loss: float32 scalar.

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


class Routed(NamedTuple):
  """The result of :func:`route` (``T`` tokens, ``k`` per token).

  Attributes:
    logits: ``(T, E)`` float32 router logits.
    weights: ``(T, k)`` routing weights.
    experts: ``(T, k)`` chosen experts.
    dropped: ``(T, k)`` bool, assignments over capacity.
    layout: the sorted layout of a grouped impl, or ``None``.
    capacity: assignments kept per expert, or ``None`` (dropless).
  """

  logits: Array
  weights: Array
  experts: Array
  dropped: Array
  layout: dispatch.Layout | None
  capacity: int | None = None

  @property
  def kept_weights(self) -> Array:
    """``(T, k)`` weights, zero where dropped."""
    return jnp.where(self.dropped, 0.0, self.weights)

  def dense_ffn(self, x: Array, projections, gated_product) -> Array:
    """The ``'dense'`` experts of ``(T, d)`` tokens ``x``.

    See :func:`flaxact._src.moe.experts.dense.experts_ffn`.
    """
    return dense.experts_ffn(
      x,
      self.weights,
      self.experts,
      self.dropped,
      projections,
      gated_product,
      num_experts=self.logits.shape[-1],
      capacity=self.capacity,
    )

  def aux(self, lead: tuple[int, ...]) -> MoEAux:
    """The :class:`MoEAux`, token axes reshaped to ``lead``."""
    e, k = self.logits.shape[-1], self.experts.shape[-1]
    return MoEAux(
      router_logits=self.logits.reshape(*lead, e),
      weights=self.weights.reshape(*lead, k),
      experts=self.experts.reshape(*lead, k),
      dropped=self.dropped.reshape(*lead, k),
      expert_load=jax.nn.one_hot(self.experts, e, dtype=jnp.int32).sum((0, 1)),
      dropped_tokens=self.dropped.sum().astype(jnp.int32),
      load_balancing_loss=load_balancing_loss(self.logits, self.experts, e),
      router_z_loss=router_z_loss(self.logits),
    )


def route(
  logits: Array,
  settings: RoutingSettings,
  *,
  score_correction_bias: Any,
  impl: str,
  mesh: Any,
) -> Routed:
  """Top-k routing of ``(T, E)`` logits and, for grouped impls, the layout.

  Args:
    logits: ``(T, E)`` float32.
    settings: the routing options.
    score_correction_bias: ``(E,)`` for the sigmoid router, or ``None``.
    impl: a resolved impl (not ``'auto'``).
    mesh: the expert-parallel mesh or ``None``.

  Returns:
    The :class:`Routed`.

  Raises:
    ValueError: ``capacity_factor`` with a mesh (grouped impls).
  """
  weights, experts = settings.top_k(logits, score_correction_bias)
  t, k = experts.shape
  e = logits.shape[-1]
  capacity = settings.capacity(tokens=t, num_experts=e)
  if t == 0:  # no tokens: nothing to lay out (the caller returns zeros)
    return Routed(logits, weights, experts, jnp.zeros((t, k), bool), None)
  if mesh is not None and impl != 'dense':
    if capacity is not None:
      raise ValueError(
        'moe_ffn: capacity_factor with expert parallelism (mesh=...) is not'
        f' supported; got capacity_factor={settings.capacity_factor}. Use the'
        ' dropless default (capacity_factor=None) with a mesh.'
      )
    return Routed(logits, weights, experts, jnp.zeros((t, k), bool), None)
  if impl == 'dense':
    dropped = jnp.zeros((t, k), bool)
    if capacity is not None:
      rank = dense.expert_rank(experts.reshape(-1), e)
      dropped = (rank >= capacity).reshape(t, k)
    return Routed(logits, weights, experts, dropped, None, capacity)
  tile = 1 if impl in RAGGED_IMPLS else int(settings.tile_size)
  layout = dispatch.make_layout(experts, e, tile, capacity)
  return Routed(logits, weights, experts, layout.dropped, layout, capacity)
