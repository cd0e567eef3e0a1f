"""The framework-free part of the ``MoE`` layers, shared by Linen and NNX.

Both :mod:`flaxact.linen` and :mod:`flaxact.nnx` hold their parameters in
their own way, validate their options with :func:`check_options` and run
:func:`routed` on plain (already promoted) arrays, so given the same weights
the two APIs run the same operations in the same order.

Names recorded by the layers (Linen ``self.sow('intermediates', ...)``, NNX
``nnx.Intermediate``): :data:`RECORDED`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax.core import spmd

from flaxact._src.common.checks import check_positive_int, normalise_choice
from flaxact._src.layers import ffn_body, remat
from flaxact._src.moe import api, routers, routing_step
from flaxact._src.moe.dispatch import GATE as MOE_GATE
from flaxact._src.moe.dispatch import UP as MOE_UP

Array = jax.Array

#: The names a ``MoE`` layer records on every call (never added to ``y``).
RECORDED = ('load_balancing_loss', 'router_z_loss', 'expert_load')

#: The remat policy of ``MoE(remat=True)``: the experts' gate and up
#: pre-activations (``'moe_gate'``, ``'moe_up'``) and the shared expert's
#: (``'ffn_gate'``, ``'ffn_up'``); everything else is recomputed.
MOE_LAYER_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(
  MOE_GATE, MOE_UP, remat.GATE, remat.UP
)


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
  """The routing and expert options :func:`api.moe_ffn` takes."""

  experts_per_token: int
  router: str
  normalize_weights: bool
  routed_scaling_factor: float
  num_groups: int | None
  groups_per_token: int | None
  activation: Any
  gated_product: Callable[[Array, Array], Array] | None
  capacity_factor: float | None
  impl: str
  tile_size: int


class RoutingOptions(Protocol):
  """The ``MoE`` layer attributes :func:`routing_settings` reads."""

  @property
  def experts_per_token(self) -> int: ...
  @property
  def normalize_weights(self) -> bool: ...
  @property
  def routed_scaling_factor(self) -> float: ...
  @property
  def num_groups(self) -> int | None: ...
  @property
  def groups_per_token(self) -> int | None: ...
  @property
  def activation(self) -> Any: ...
  @property
  def gated_product(self) -> Callable[[Array, Array], Array] | None: ...
  @property
  def capacity_factor(self) -> float | None: ...
  @property
  def impl(self) -> str: ...
  @property
  def tile_size(self) -> int: ...


def routing_settings(layer: RoutingOptions, *, router: str) -> RoutingSettings:
  """The :class:`RoutingSettings` of a Linen or NNX ``MoE`` layer.

  Args:
    layer: the layer; its routing and expert attributes are read.
    router: the normalised router name (``'softmax'`` or ``'sigmoid'``).

  Returns:
    The settings :func:`routed` takes.
  """
  return RoutingSettings(
    experts_per_token=layer.experts_per_token,
    router=router,
    normalize_weights=layer.normalize_weights,
    routed_scaling_factor=layer.routed_scaling_factor,
    num_groups=layer.num_groups,
    groups_per_token=layer.groups_per_token,
    activation=layer.activation,
    gated_product=layer.gated_product,
    capacity_factor=layer.capacity_factor,
    impl=layer.impl,
    tile_size=layer.tile_size,
  )


class Aux(NamedTuple):
  """What a ``MoE`` call records (see :data:`RECORDED`).

  ``dropped_assignments`` (``()`` int32, assignments dropped over capacity)
  is recorded too when the layer has a ``capacity_factor``.
  """

  load_balancing_loss: Array
  router_z_loss: Array
  expert_load: Array
  dropped_assignments: Array | None = None

  def recorded(self) -> dict[str, Array]:
    """The values to record by name (:data:`RECORDED`, and the drops)."""
    out = {name: getattr(self, name) for name in RECORDED}
    if self.dropped_assignments is not None:
      out['dropped_assignments'] = self.dropped_assignments
    return out


def check_options(
  owner: str,
  *,
  hidden_features: Any,
  num_experts: Any,
  experts_per_token: Any,
  activation: Any,
  gated_product: Any,
  router: Any,
  num_groups: Any,
  groups_per_token: Any,
  shared_hidden_features: Any,
  shared_expert_gate: bool,
  capacity_factor: Any,
  impl: Any,
  tile_size: Any,
  module_type: type,
  hooked: bool,
) -> tuple[str, str]:
  """Validates the ``MoE`` options; returns ``(router, impl)`` normalised.

  Raises:
    ValueError: for ``experts_per_token`` outside ``[1, num_experts]``, an
      unknown router or impl (or a grouped impl with ``hooked``, a
      ``dot_general``/``dot_general_cls`` hook), groups that do not divide
      the experts (or groups with the softmax router),
      ``capacity_factor <= 0``, a ``shared_expert_gate`` without a shared
      expert, or a width that is not a positive integer.
    TypeError: for a non-integer ``experts_per_token``, a learnable
      activation module, a ``gated_product`` that is not callable or a
      ``capacity_factor`` that is not a number.
  """
  check_positive_int(hidden_features, 'hidden_features', owner)
  e = check_positive_int(num_experts, 'num_experts', owner)
  k = routers.check_k(experts_per_token, e, owner)
  check_positive_int(tile_size, 'tile_size', owner)
  try:
    router = normalise_choice(router, routers.ROUTERS, 'router', 'routers')
    impl = normalise_choice(impl, routing_step.IMPLS, 'impl', 'impls')
    if impl != 'auto':
      routing_step.resolve_impl(impl, hooked=hooked)
  except ValueError as err:
    raise ValueError(f'{owner}: {err}') from None
  if isinstance(activation, module_type):
    raise TypeError(
      f'{owner}: the experts need a stateless activation (a registry name or'
      f' a function); got the learnable module {activation!r}.'
    )
  ffn_body.resolve_activation(activation, owner)
  if gated_product is not None and not callable(gated_product):
    raise TypeError(
      f'{owner}: gated_product must be a (gate, up) -> hidden function or'
      f' None; got {gated_product!r}.'
    )
  if router == 'softmax' and num_groups is not None:
    raise ValueError(
      f"{owner}: num_groups/groups_per_token need router='sigmoid'"
      f" (DeepSeek-V3); got router='softmax', num_groups={num_groups}."
    )
  for name, value in (
    ('num_groups', num_groups),
    ('groups_per_token', groups_per_token),
  ):
    if value is not None:
      check_positive_int(value, name, owner)
  try:
    routers.check_groups(num_groups, groups_per_token, e, k)
  except ValueError as err:
    raise ValueError(
      f'{owner}: {str(err).removeprefix("top_k_routing: ")}'
    ) from None
  try:
    routing_step.capacity_of(capacity_factor, 1, 1, 1)
  except (TypeError, ValueError) as err:
    raise type(err)(f'{owner}: {err}') from None
  if shared_hidden_features is not None:
    check_positive_int(shared_hidden_features, 'shared_hidden_features', owner)
  elif shared_expert_gate:
    raise ValueError(
      f'{owner}: shared_expert_gate=True gates the shared expert, so it needs'
      ' shared_hidden_features; got shared_hidden_features=None.'
    )
  return router, impl


def stacked_init(init: Callable[..., Array]) -> Callable[..., Array]:
  """Initialises ``(E, *shape)`` as ``E`` kernels of ``shape``, one key each.

  Variance-scaling initialisers then see the fans of one expert's kernel
  (``in`` and ``out``), not the experts axis.
  """

  def init_stacked(key: Array, shape: Sequence[int], dtype: Any = jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

  return init_stacked


def expert_mesh() -> tuple[Any, str]:
  """``(mesh, axis)`` for expert parallelism, or ``(None, 'expert')``.

  Expert parallelism applies when a mesh is set (``jax.set_mesh``) and the
  active logical axis rules map ``'exp'`` to one of its axes of size > 1.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, 'expert'
  axis = None
  for name, mesh_axis in spmd.get_logical_axis_rules():
    if name == 'exp':
      axis = mesh_axis
      break
  if not isinstance(axis, str) or axis not in mesh.axis_names:
    return None, 'expert'
  if mesh.shape[axis] == 1:
    return None, 'expert'
  return mesh, axis


class ExpertCall(Protocol):
  """A Linen or NNX ``ExpertProjection``: its weights or its projection."""

  def __call__(
    self, dtype: Any, x: Array | None = None, *, bias_scale: Any = None
  ) -> Any: ...


def routed(
  x: Array,
  logits: Array,
  experts: Sequence[ExpertCall],
  *,
  settings: RoutingSettings,
  score_correction_bias: Array | None,
  precision: Any,
  hooked: bool,
) -> tuple[Array, Aux]:
  """The routed experts of ``x`` given the router's ``logits``.

  With impl ``'dense'`` (also what ``'auto'`` means under a ``dot_general``
  hook or a Qwix interception) each expert projection runs inside its own
  module, so a quantizer sees the matmul with the module's kernel;
  otherwise the promoted kernels go to :func:`api.moe_ffn`'s grouped
  matmul.

  Args:
    x: ``(..., in)`` in the compute dtype.
    logits: ``(..., E)`` router logits (float32).
    experts: ``gate_proj``, ``up_proj`` and ``down_proj``.
    settings: the routing options.
    score_correction_bias: ``(E,)`` for the sigmoid router, else ``None``.
    precision: matmul precision.
    hooked: whether ``dot_general``/``dot_general_cls`` is set.

  Returns:
    ``(y, aux)``: ``y`` of shape ``(..., out)`` in the dtype of ``x``.

  Raises:
    TypeError: for quantized (non-array) kernels with a grouped impl.
  """
  s = settings
  impl = api.resolve_impl(s.impl, hooked=hooked)
  routing: dict[str, Any] = dict(
    router=s.router,
    normalize_weights=s.normalize_weights,
    score_correction_bias=score_correction_bias,
    routed_scaling_factor=s.routed_scaling_factor,
    num_groups=s.num_groups,
    groups_per_token=s.groups_per_token,
  )
  prod = api.expert_product(s.activation, s.gated_product)
  if impl == 'dense':
    lead, e = x.shape[:-1], logits.shape[-1]
    r = routing_step.route(
      logits.reshape(-1, e),
      s.experts_per_token,
      capacity_factor=s.capacity_factor,
      impl=impl,
      tile_size=s.tile_size,
      mesh=None,
      **routing,
    )
    gate, up, down = (functools.partial(p, x.dtype) for p in experts)
    tokens = x.reshape(-1, x.shape[-1])
    y = r.dense_ffn(tokens, (gate, up, down), prod)
    aux = _aux(r.aux(lead), s.capacity_factor)
    return y.reshape(*lead, y.shape[-1]).astype(x.dtype), aux
  (gk, gb), (uk, ub), (dk, db) = (p(x.dtype) for p in experts)
  for name, kernel in zip(('gate', 'up', 'down'), (gk, uk, dk), strict=True):
    if not isinstance(kernel, jax.Array):
      raise TypeError(
        f'MoE: the {name}_proj kernel is a {type(kernel).__name__}, not an'
        f' array; the grouped impl {impl!r} cannot compute with it. Use'
        " impl='auto' or 'dense' with quantized weights."
      )
  mesh, axis = expert_mesh()
  y, aux = api.moe_ffn(
    x,
    jax.ShapeDtypeStruct((x.shape[-1], logits.shape[-1]), jnp.float32),
    gk,
    uk,
    dk,
    experts_per_token=s.experts_per_token,
    gate_bias=gb,
    up_bias=ub,
    down_bias=db,
    gated_product=prod,
    capacity_factor=s.capacity_factor,
    impl=impl,
    tile_size=s.tile_size,
    precision=precision,
    router_logits=logits,
    mesh=mesh,
    expert_axis=axis,
    **routing,
  )
  return y, _aux(aux, s.capacity_factor)


def _aux(aux: routing_step.MoEAux, capacity_factor: Any) -> Aux:
  dropped = None if capacity_factor is None else aux.dropped_tokens
  return Aux(
    aux.load_balancing_loss, aux.router_z_loss, aux.expert_load, dropped
  )


def add_shared(y: Array, shared: Array, gate_logit: Array | None) -> Array:
  """``y + shared``, the shared expert gated by ``sigmoid(gate_logit)``."""
  if gate_logit is not None:
    shared = jax.nn.sigmoid(gate_logit) * shared
  return y + shared.astype(y.dtype)


def router_name(router: str) -> str:
  """The normalised router name (``'softmax'`` or ``'sigmoid'``)."""
  return normalise_choice(router, routers.ROUTERS, 'router', 'routers')
