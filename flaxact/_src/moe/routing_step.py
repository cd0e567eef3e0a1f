"""The routing step of a routed FFN: top-k, capacity, layout and aux.

:func:`route` turns float32 router logits into what every experts impl
needs: the routing weights and experts, the assignments dropped over
capacity, the sorted layout of the grouped impls (``None`` for ``'dense'``
and under expert parallelism, which build their own) and the auxiliary
outputs (:class:`MoEAux`). :func:`resolve_impl` picks the impl for
``'auto'``.
"""

from __future__ import annotations

import fractions
import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxact._src.common.checks import normalise_choice
from flaxact._src.common.interception import dot_general_intercepted
from flaxact._src.common.tracing import transforms
from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import dense
from flaxact._src.moe.experts import grouped as gm
from flaxact._src.moe.routers import (
  load_balancing_loss,
  router_z_loss,
  top_k_routing,
)

Array = jax.Array


class GroupedImplUnderQuantizerWarning(UserWarning):
  """A grouped experts impl ran where a quantizer intercepts matmuls."""


#: Every ``impl`` value: the grouped impls, ``'dense'`` and ``'auto'``.
IMPLS = (*gm.IMPLS, 'dense', 'auto')

#: Default rows per tile of the ``'loop'`` and ``'tiles'`` impls.
DEFAULT_TILE = 128


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


def resolve_impl(impl: str, *, hooked: bool = False) -> str:
  """The experts impl that ``impl`` means here, at trace time.

  ``'auto'`` is ``'dense'`` when the experts' matmuls must be visible to a
  quantizer: ``hooked`` (a ``dot_general`` hook is set) or
  ``jax.lax.dot_general`` intercepted (Qwix); otherwise ``'loop'`` on CPU
  and ``'ragged'`` on GPU and TPU.

  Args:
    impl: ``'auto'``, ``'loop'``, ``'tiles'``, ``'ragged'`` or ``'dense'``.
    hooked: whether a ``dot_general`` hook is set.

  Raises:
    ValueError: for an unknown impl, or a grouped impl with ``hooked``.

  Warns:
    GroupedImplUnderQuantizerWarning: a grouped impl given explicitly while
      ``jax.lax.dot_general`` is intercepted.
  """
  impl = normalise_choice(impl, IMPLS, 'impl', 'impls')
  if impl == 'auto':
    if hooked or dot_general_intercepted():
      return 'dense'
    return 'loop' if jax.default_backend() == 'cpu' else 'ragged'
  if hooked and impl != 'dense':
    raise ValueError(
      f"impl={impl!r} runs the experts in flaxact's grouped matmul, which a"
      " dot_general hook cannot reach; use impl='auto' or 'dense' with"
      ' dot_general/dot_general_cls.'
    )
  if impl != 'dense' and dot_general_intercepted():
    warnings.warn(
      f'MoE: impl={impl!r} while jax.lax.dot_general is intercepted (Qwix):'
      " the experts' grouped matmul is not a quantization point, so their"
      ' kernels stay float (and a QAT rule matching the MoE module itself'
      ' fake-quantizes the grouped forward only). Use the default'
      " impl='auto' (or 'dense') to quantize the experts; filter this"
      ' warning if only the router or shared expert is meant.',
      GroupedImplUnderQuantizerWarning,
      stacklevel=2,
    )
  return impl


def transform_impl(impl: str, *arrays: Any) -> tuple[str, bool]:
  """The grouped impl to run under the transforms tracing ``arrays``.

  Returns ``(impl, lean)``; ``lean`` is whether the experts may run under
  their ``custom_vjp`` (the memory-lean backward). Under forward-mode
  autodiff (``jax.jvp``, ``jax.jacfwd``; a ``custom_vjp`` has no JVP) every
  grouped impl runs as ``'tiles'`` differentiated by plain autodiff, and
  under ``vmap`` ``'ragged'`` runs as ``'tiles'`` (``lax.ragged_dot`` has no
  batching rule for an unbatched kernel). The results are the same.

  Args:
    impl: a resolved impl.
    *arrays: the inputs of the routed FFN (pytrees; ``None`` is fine).
  """
  if impl not in gm.IMPLS:
    return impl, True
  found = transforms(*arrays)
  if 'jvp' in found:
    return 'tiles', False
  if 'batch' in found and impl == 'ragged':
    return 'tiles', True
  return impl, True


def capacity_of(capacity_factor, tokens: Any, k: int, num_experts: int) -> Any:
  """``ceil(capacity_factor * tokens * k / num_experts)``, or ``None``.

  At least 1, and ``tokens`` wherever that is at most the formula (so an
  infinite factor is dropless). ``tokens`` may be a symbolic dimension
  (:func:`jax.export`).
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
  experts_per_token: int,
  *,
  capacity_factor: float | None,
  impl: str,
  tile_size: int,
  mesh: Any,
  **routing: Any,
) -> Routed:
  """Top-k routing of ``(T, E)`` logits and, for grouped impls, the layout.

  Args:
    logits: ``(T, E)`` float32.
    experts_per_token: ``k``.
    capacity_factor: ``None`` (dropless) or a positive number.
    impl: a resolved impl (not ``'auto'``).
    tile_size: rows per tile of ``'loop'`` and ``'tiles'``.
    mesh: the expert-parallel mesh or ``None``.
    **routing: the keyword arguments of :func:`top_k_routing`.

  Returns:
    The :class:`Routed`.

  Raises:
    ValueError: ``capacity_factor`` with a mesh (grouped impls).
  """
  weights, experts = top_k_routing(logits, experts_per_token, **routing)
  t, k = experts.shape
  e = logits.shape[-1]
  capacity = capacity_of(capacity_factor, t, k, e)
  if t == 0:  # no tokens: nothing to lay out (the caller returns zeros)
    return Routed(logits, weights, experts, jnp.zeros((t, k), bool), None)
  if mesh is not None and impl != 'dense':
    if capacity is not None:
      raise ValueError(
        'moe_ffn: capacity_factor with expert parallelism (mesh=...) is not'
        f' supported; got capacity_factor={capacity_factor}. Use the'
        ' dropless default (capacity_factor=None) with a mesh.'
      )
    return Routed(logits, weights, experts, jnp.zeros((t, k), bool), None)
  if impl == 'dense':
    dropped = jnp.zeros((t, k), bool)
    if capacity is not None:
      rank = dense.expert_rank(experts.reshape(-1), e)
      dropped = (rank >= capacity).reshape(t, k)
    return Routed(logits, weights, experts, dropped, None, capacity)
  tile = 1 if impl == 'ragged' else int(tile_size)
  layout = dispatch.make_layout(experts, e, tile, capacity)
  return Routed(logits, weights, experts, layout.dropped, layout, capacity)
