"""The framework-free part of the ``MoE`` layers, shared by Linen and NNX.

Both :mod:`flaxact.linen` and :mod:`flaxact.nnx` hold their parameters in
their own way, validate their options with :func:`check_options` (the
routing options as one
:class:`~flaxact._src.moe.settings.RoutingSettings`) and run :func:`routed`
on plain (already promoted) arrays, so given the same weights the two APIs
run the same operations in the same order.

Names recorded by the layers (Linen ``self.sow('intermediates', ...)``, NNX
``nnx.Intermediate``): :data:`RECORDED`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, overload

import jax
import jax.numpy as jnp
from flax.core import spmd

from flaxact._src.common.checks import check_positive_int
from flaxact._src.common.interception import (
  dot_general_intercepted,
  without_qwix_interception,
)
from flaxact._src.layers import ffn_body
from flaxact._src.moe import routing_step
from flaxact._src.moe.experts import fake_quant
from flaxact._src.moe.experts import quantized as quantized_kernels
from flaxact._src.moe.experts.api import resolve_impl, transform_impl
from flaxact._src.moe.routed import routed_experts
from flaxact._src.moe.settings import RoutingSettings

Array = jax.Array

#: The expert projections, in order.
PROJECTIONS = ('gate_proj', 'up_proj', 'down_proj')
#: The names a ``MoE`` layer records on every call (never added to ``y``).
RECORDED = (
  'load_balancing_loss',
  'sequence_balance_loss',
  'router_z_loss',
  'expert_load',
)


class Aux(NamedTuple):
  """What a ``MoE`` call records (see :data:`RECORDED`).

  ``dropped_assignments`` (``()`` int32, the assignments of real tokens
  dropped over capacity in this call) is recorded too when the layer has a
  ``capacity_factor`` or an ``ep_capacity_factor``, and
  ``dropped_per_device`` (``(S,)`` int32, the expert-parallel exchange's
  drops on each device holding tokens) when the layer ran expert-parallel
  with an ``ep_capacity_factor``.
  """

  load_balancing_loss: Array
  sequence_balance_loss: Array
  router_z_loss: Array
  expert_load: Array
  dropped_assignments: Array | None = None
  dropped_per_device: Array | None = None

  def recorded(self) -> dict[str, Array]:
    """The values to record by name (:data:`RECORDED`, and the drops)."""
    out = {name: getattr(self, name) for name in RECORDED}
    if self.dropped_assignments is not None:
      out['dropped_assignments'] = self.dropped_assignments
    if self.dropped_per_device is not None:
      out['dropped_per_device'] = self.dropped_per_device
    return out


def check_options(
  owner: str,
  routing: RoutingSettings,
  *,
  num_experts: Any,
  hidden_features: Any,
  activation: Any,
  gated_product: Any,
  shared_hidden_features: Any,
  shared_expert_gate: bool,
  module_type: type,
  hooked: bool,
) -> RoutingSettings:
  """Validates the ``MoE`` options; returns ``routing`` checked.

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
  routing = routing.check(owner, num_experts=e, hooked=hooked)
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
  if shared_hidden_features is not None:
    check_positive_int(shared_hidden_features, 'shared_hidden_features', owner)
  elif shared_expert_gate:
    raise ValueError(
      f'{owner}: shared_expert_gate=True gates the shared expert, so it needs'
      ' shared_hidden_features; got shared_hidden_features=None.'
    )
  return routing


def stacked_init(init: Callable[..., Array]) -> Callable[..., Array]:
  """Initialises ``(E, *shape)`` as ``E`` kernels of ``shape``, one key each.

  Variance-scaling initialisers then see the fans of one expert's kernel
  (``in`` and ``out``), not the experts axis.
  """

  def init_stacked(key: Array, shape: Sequence[int], dtype: Any = jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

  return init_stacked


def _mesh_axis(mesh: Any, logical: str) -> str | None:
  """The mesh axis (of size > 1) the active rules map ``logical`` to."""
  axis = None
  for name, mesh_axis in spmd.get_logical_axis_rules():
    if name == logical:  # the first rule naming it wins
      axis = mesh_axis
      break
  if not isinstance(axis, str) or axis not in mesh.axis_names:
    return None
  return axis if mesh.shape[axis] > 1 else None


def expert_mesh() -> tuple[Any, str]:
  """``(mesh, axis)`` for expert parallelism, or ``(None, 'expert')``.

  Expert parallelism applies when a mesh is set (``jax.set_mesh``) and the
  active logical axis rules map ``'exp'`` to one of its axes of size > 1.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axis = None if mesh.empty else _mesh_axis(mesh, 'exp')
  return (None, 'expert') if axis is None else (mesh, axis)


def tensor_axis(mesh: Any, expert_axis: str) -> str | None:
  """The mesh axis of the experts' ``'mlp'`` axis under expert parallelism.

  ``None`` without a mesh, or where the rules leave ``'mlp'`` replicated
  (or map it to ``expert_axis``).
  """
  if mesh is None:
    return None
  axis = _mesh_axis(mesh, 'mlp')
  return None if axis == expert_axis else axis


class Experts(Protocol):
  """A Linen or NNX ``ExpertProjection``."""

  def weights(self, dtype: Any) -> tuple[Any, Any]:
    """``(kernel, bias)`` promoted to ``dtype`` (``bias`` may be ``None``)."""
    ...

  def quantization_rule(self) -> Any:
    """The Qwix rule matching the projection now, or ``None``."""
    ...

  def __call__(
    self, x: Array, *, dtype: Any, bias_scale: Array | None = None
  ) -> Array:
    """Every expert's projection of its rows ``x``, ``(rows, E, in)``."""
    ...


def routed(
  x: Array,
  logits: Array,
  experts: Sequence[Experts],
  *,
  routing: RoutingSettings,
  product: Callable[[Array, Array], Array],
  score_correction_bias: Array | None,
  precision: Any,
  hooked: bool,
  token_mask: Array | None = None,
) -> tuple[Array, Aux]:
  """The routed experts of ``x`` given the router's ``logits``.

  With impl ``'dense'`` (also what ``'auto'`` means under a ``dot_general``
  hook or a Qwix interception of float kernels) each expert projection runs
  inside its own module, so a quantizer sees the matmul with the module's
  kernel; otherwise the promoted kernels go to the grouped matmul of
  :func:`~flaxact._src.moe.routed.routed_experts`.
  Quantized kernels (a Qwix PTQ model's int8 values and
  per-expert, per-channel scales) go to the grouped matmul too under
  ``'auto'`` (one device), which dequantizes one expert's kernel at a time;
  so do float kernels under Qwix QAT rules with default options (each
  projection's rule read with ``qwix.pallas.get_current_rule``), quantized
  as Qwix quantizes ``'dense'``
  (:mod:`flaxact._src.moe.experts.fake_quant`). The grouped matmuls then
  run with Qwix's interception off.

  Args:
    x: ``(..., in)`` in the compute dtype.
    logits: ``(..., E)`` router logits (float32).
    experts: ``gate_proj``, ``up_proj`` and ``down_proj``.
    routing: the routing options.
    product: the experts' ``(gate, up) -> hidden``.
    score_correction_bias: ``(E,)`` for the sigmoid router, else ``None``.
    precision: matmul precision.
    hooked: whether ``dot_general``/``dot_general_cls`` is set.
    token_mask: ``x.shape[:-1]`` bool (checked), ``True`` for a real token;
      masked tokens get zero output and count in no statistic.

  Returns:
    ``(y, aux)``: ``y`` of shape ``(..., out)`` in the dtype of ``x``.

  Raises:
    TypeError: for kernels that are neither arrays nor Qwix quantized arrays
      with a grouped impl.
    ValueError: for a quantized kernel whose scale is not ``(E, 1, out)``
      (or has a zero point), or quantized kernels under expert parallelism
      with a grouped impl.
  """
  weights = [p.weights(x.dtype) for p in experts]
  mesh, axis = expert_mesh()
  quantized = any(quantized_kernels.is_quantized(w) for w, _ in weights)
  qat = None  # Qwix QAT settings the grouped impls can follow
  if (
    not (quantized or hooked or mesh is not None) and dot_general_intercepted()
  ):
    qat = fake_quant.qat_configs([p.quantization_rule() for p in experts])
  # The grouped impls quantize by themselves: PTQ kernels, QAT settings.
  own = (quantized or qat is not None) and mesh is None
  impl = resolve_impl(routing.impl, hooked=hooked, quantized=own)
  kernels = biases = None
  lean = True
  if impl != 'dense':
    kernels, biases = _grouped_weights(weights, x.dtype, impl, mesh)
    impl, lean = transform_impl(
      impl, x, logits, score_correction_bias, kernels, biases
    )
    if qat is not None:
      # forward-mode autodiff (no custom VJP) differentiates Qwix's own
      impl = impl if lean else 'dense'
      product = fake_quant.QatProduct(product, qat)
  lead, e = x.shape[:-1], logits.shape[-1]
  tokens = x.reshape(-1, x.shape[-1])
  if impl == 'dense':
    mesh, axis = None, 'expert'
  r = routing_step.route(
    logits.reshape(-1, e),
    routing,
    score_correction_bias=score_correction_bias,
    impl=impl,
    mesh=mesh,
    token_mask=None if token_mask is None else token_mask.reshape(-1),
  )
  if impl == 'dense':
    projections = tuple(functools.partial(p, dtype=x.dtype) for p in experts)
    y = r.dense_ffn(tokens, projections, product)
  else:
    run = routed_experts
    if own:  # no Qwix rule may quantize the grouped matmuls again
      run = without_qwix_interception(run)
    y, r = run(
      tokens,
      r,
      kernels,
      biases,
      gated_product=product,
      impl=impl,
      tile_size=routing.tile_size,
      precision=precision,
      dot_general=None,
      mesh=mesh,
      expert_axis=axis,
      lean=lean,
      ep_capacity_factor=routing.ep_capacity_factor,
      tensor_axis=tensor_axis(mesh, axis),
    )
  a = r.aux(lead)
  counted = routing.capacity_factor, routing.ep_capacity_factor
  dropped = None if counted == (None, None) else a.dropped_tokens
  per_device = None
  if routing.ep_capacity_factor is not None:
    per_device = a.dropped_per_device
  aux = Aux(
    a.load_balancing_loss,
    a.sequence_balance_loss,
    a.router_z_loss,
    a.expert_load,
    dropped,
    per_device,
  )
  return y.reshape(*lead, y.shape[-1]).astype(x.dtype), aux


def _grouped_weights(weights, dtype: Any, impl: str, mesh: Any):
  """``(kernels, biases)`` of the experts, each ``(gate, up, down)``.

  A Qwix quantized kernel becomes a
  :class:`~flaxact._src.moe.experts.quantized.QuantizedKernel`.
  """
  kernels = []
  for name, (kernel, _) in zip(PROJECTIONS, weights, strict=True):
    if quantized_kernels.is_quantized(kernel):
      if mesh is not None:
        raise ValueError(
          f'MoE: the {name} kernel is quantized; the grouped impl {impl!r}'
          ' serves quantized kernels on one device (no expert mesh); got an'
          " expert-parallel mesh. Use impl='dense' or 'auto'."
        )
      kernel = quantized_kernels.from_qwix(kernel, name, dtype)
    elif not isinstance(kernel, jax.Array):
      raise TypeError(
        f'MoE: the {name} kernel is a {type(kernel).__name__}, not an'
        f' array; the grouped impl {impl!r} cannot compute with it. Use'
        " impl='auto' or 'dense' with quantized weights."
      )
    kernels.append(kernel)
  return tuple(kernels), tuple(w[1] for w in weights)


def add_shared(y: Array, shared: Array, gate_logit: Array | None) -> Array:
  """``y + shared``, the shared expert gated by ``sigmoid(gate_logit)``."""
  if gate_logit is not None:
    shared = jax.nn.sigmoid(gate_logit) * shared
  return y + shared.astype(y.dtype)


T = TypeVar('T')


class RoutingField(Generic[T]):
  """A layer attribute that reads and replaces one field of ``routing``.

  ``layer.impl = 'loop'`` replaces ``layer.routing`` by a copy with the new
  ``impl``; the settings stay one frozen object.
  """

  def __set_name__(self, owner: type, name: str) -> None:
    self.name = name

  @overload
  def __get__(self, layer: None, owner: type) -> RoutingField[T]: ...
  @overload
  def __get__(self, layer: Any, owner: type) -> T: ...
  def __get__(self, layer, owner=None):
    if layer is None:
      return self
    return getattr(layer.routing, self.name)

  def __set__(self, layer: Any, value: T) -> None:
    changes = {self.name: value}
    layer.routing = dataclasses.replace(layer.routing, **changes)
