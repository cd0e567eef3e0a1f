"""How a routed FFN routes: one frozen, validated set of options.

:class:`RoutingSettings` holds the options that choose the experts of each
token and how the experts run: ``k``, the router and its weighting, expert
groups, capacity, the experts impl and its tile size. The Linen and NNX
``MoE`` layers build it from their arguments and validate it once
(:meth:`RoutingSettings.check`); :func:`flaxact.moe_ffn` builds it from its
own and checks each option where it is used.

Examples:
  >>> from flaxact._src.moe.settings import RoutingSettings
  >>> s = RoutingSettings(experts_per_token=2, router='Sigmoid', impl='LOOP')
  >>> s = s.check('MoE', num_experts=8, hooked=False)
  >>> s.router, s.impl, s.capacity(tokens=6, num_experts=8)
  ('sigmoid', 'loop', None)
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from typing import Any, Literal

import jax

from flaxact._src.common.checks import check_positive_int, normalise_choice
from flaxact._src.moe import routers
from flaxact._src.moe.experts import exchange
from flaxact._src.moe.experts.api import (
  Impl,
  check_explicit_impl,
  check_impl,
)

Array = jax.Array

#: A router name.
Router = Literal['softmax', 'sigmoid']


def capacity_of(capacity_factor, tokens: Any, k: int, num_experts: int) -> Any:
  """``ceil(capacity_factor * tokens * k / num_experts)``, or ``None``.

  At least 1, and ``tokens`` wherever that is at most the formula (so an
  infinite factor is dropless). ``tokens`` may be a symbolic dimension
  (:func:`jax.export`).

  Raises:
    TypeError: for a ``capacity_factor`` that is not a number.
    ValueError: for ``capacity_factor <= 0``.
  """
  if capacity_factor is None:
    return None
  if isinstance(capacity_factor, bool) or not isinstance(
    capacity_factor, numbers.Real
  ):
    raise TypeError(
      f'capacity_factor must be a positive number or None; got'
      f' {capacity_factor!r}.'
    )
  capacity_factor = float(capacity_factor)
  if not capacity_factor > 0:
    raise ValueError(
      f'capacity_factor must be positive (or None for dropless); got'
      f' {capacity_factor}.'
    )
  if capacity_factor * k >= num_experts:
    # At least T: never binds (an expert gets at most one assignment per
    # token), also for float('inf') and a symbolic token count.
    return tokens if jax.export.is_symbolic_dim(tokens) else max(1, tokens)
  if jax.export.is_symbolic_dim(tokens):  # jax.export: exact rational ceil
    ratio = fractions.Fraction(capacity_factor) * k / num_experts
    num, den = ratio.numerator, ratio.denominator
    return (num * tokens + den - 1) // den
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingSettings:
  """The routing options of a routed FFN (see :func:`flaxact.moe_ffn`).

  Attributes:
    experts_per_token: ``k``, in ``[1, E]``.
    router: ``'softmax'`` or ``'sigmoid'``.
    normalize_weights: renormalise the ``k`` weights to sum to 1.
    routed_scaling_factor: multiplies the routing weights (DeepSeek-V3).
    num_groups: sigmoid router: experts form this many equal groups.
    groups_per_token: sigmoid router: groups kept per token.
    capacity_factor: ``None`` (dropless) or a positive number.
    ep_capacity_factor: ``None`` (dropless) or a positive number: the
      per-peer row budget of the expert-parallel exchange
      (:func:`flaxact._src.moe.experts.exchange.peer_budget`).
    impl: the experts' matmul (see :mod:`flaxact._src.moe.experts.api`).
    tile_size: rows per tile of the ``'loop'`` and ``'tiles'`` impls;
      ``None`` picks it from the shape
      (:func:`flaxact._src.moe.experts.api.tile_rows`).
  """

  experts_per_token: int
  router: Router | str = 'softmax'
  normalize_weights: bool = True
  routed_scaling_factor: float = 1.0
  num_groups: int | None = None
  groups_per_token: int | None = None
  capacity_factor: float | None = None
  ep_capacity_factor: float | None = None
  impl: Impl | str = 'auto'
  tile_size: int | None = None

  def check(
    self, owner: str, *, num_experts: int, hooked: bool
  ) -> RoutingSettings:
    """These settings validated, router and impl names normalised.

    Args:
      owner: the layer's name, for the messages.
      num_experts: ``E``.
      hooked: whether a ``dot_general``/``dot_general_cls`` hook is set.

    Raises:
      ValueError: for ``experts_per_token`` outside ``[1, num_experts]``, an
        unknown router or impl (or a grouped impl with ``hooked``), groups
        that do not divide the experts (or groups with the softmax router),
        ``capacity_factor <= 0`` or a ``tile_size`` that is not a positive
        integer.
      TypeError: for a non-integer ``experts_per_token`` or a
        ``capacity_factor`` that is not a number.
    """
    k = routers.check_k(self.experts_per_token, num_experts, owner)
    if self.tile_size is not None:
      check_positive_int(self.tile_size, 'tile_size', owner)
    try:
      checked = self.normalised()
      if checked.impl != 'auto':
        check_explicit_impl(checked.impl, hooked=hooked)
    except ValueError as err:
      raise ValueError(f'{owner}: {err}') from None
    self._check_groups(owner, checked.router, num_experts, k)
    try:
      capacity_of(self.capacity_factor, 1, 1, 1)
    except (TypeError, ValueError) as err:
      raise type(err)(f'{owner}: {err}') from None
    checked.check_ep_capacity(owner)
    return dataclasses.replace(checked, experts_per_token=k)

  def check_ep_capacity(self, owner: str = 'moe_ffn') -> None:
    """Validates ``ep_capacity_factor``.

    Raises:
      TypeError: for a value that is not a number or ``None``.
      ValueError: for a value that is not positive.
    """
    try:
      exchange.check_ep_capacity_factor(self.ep_capacity_factor)
    except (TypeError, ValueError) as err:
      raise type(err)(f'{owner}: {err}') from None

  def normalised(self) -> RoutingSettings:
    """These settings with the router and impl names normalised.

    Raises:
      ValueError: for an unknown router or impl.
    """
    router = normalise_choice(self.router, routers.ROUTERS, 'router', 'routers')
    return dataclasses.replace(self, router=router, impl=check_impl(self.impl))

  def _check_groups(self, owner: str, router: str, e: int, k: int) -> None:
    if router == 'softmax' and self.num_groups is not None:
      raise ValueError(
        f"{owner}: num_groups/groups_per_token need router='sigmoid'"
        f" (DeepSeek-V3); got router='softmax', num_groups={self.num_groups}."
      )
    for name, value in (
      ('num_groups', self.num_groups),
      ('groups_per_token', self.groups_per_token),
    ):
      if value is not None:
        check_positive_int(value, name, owner)
    routers.check_groups(
      self.num_groups, self.groups_per_token, e, k, where=owner
    )

  def capacity(self, *, tokens: int, num_experts: int) -> int | None:
    """Assignments kept per expert for ``tokens`` tokens, or ``None``."""
    return capacity_of(
      self.capacity_factor, tokens, self.experts_per_token, num_experts
    )

  def top_k(
    self, logits: Array, score_correction_bias: Any
  ) -> tuple[Array, Array]:
    """``(weights, experts)`` of :func:`flaxact.top_k_routing`."""
    return routers.top_k_routing(
      logits,
      self.experts_per_token,
      router=self.router,
      normalize_weights=self.normalize_weights,
      score_correction_bias=score_correction_bias,
      routed_scaling_factor=self.routed_scaling_factor,
      num_groups=self.num_groups,
      groups_per_token=self.groups_per_token,
    )
