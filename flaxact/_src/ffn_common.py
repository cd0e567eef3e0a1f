"""The framework-free body of the FFN layers, shared by Linen and NNX.

Both :mod:`flaxact.linen` and :mod:`flaxact.nnx` declare their parameters in
their own way and then call the functions here on plain arrays, so the two
APIs run the same operations in the same order and, given the same weights,
return exactly equal outputs.

Checkpoint names. The layers tag their intermediates with
:func:`jax.ad_checkpoint.checkpoint_name`, so a ``jax.checkpoint`` policy of
the user's (``jax.checkpoint_policies.save_only_these_names``,
``save_any_names_but_these``, offloading policies) can save, offload or
recompute them by name:

- ``'ffn_gate'``: the gate pre-activation ``gate_proj(x)``, shape
  ``(..., hidden_features)`` (gated layers only);
- ``'ffn_up'``: the up projection ``up_proj(x)``, ``(..., hidden_features)``;
- ``'ffn_hidden'``: the hidden activation that feeds ``down_proj``
  (``act(gate) * up``, or ``act(up)`` in :class:`FFN`), before dropout;
- ``'ffn_out'``: the layer output ``down_proj(...)``.

Memory-lean backward. With ``remat=True`` (the default) the layer body runs
under ``jax.checkpoint`` with a policy that saves only ``'ffn_gate'`` and
``'ffn_up'`` (only ``'ffn_up'`` for :class:`FFN`): the backward pass keeps two
hidden-sized arrays per gated layer and recomputes the element-wise gated
product, never a matmul. Autodiff of a hand-written gated FFN keeps six.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.checks import as_float_array
from flaxact._src.gated import gated_product
from flaxact._src.registry import ACTIVATIONS, GATED_NAMES, get_activation

Array = jax.Array

#: Checkpoint name of the gate pre-activation ``gate_proj(x)``.
GATE = 'ffn_gate'
#: Checkpoint name of the up projection ``up_proj(x)``.
UP = 'ffn_up'
#: Checkpoint name of the hidden activation fed to ``down_proj``.
HIDDEN = 'ffn_hidden'
#: Checkpoint name of the layer output.
OUT = 'ffn_out'
#: Every checkpoint name the FFN layers use.
CHECKPOINT_NAMES = (GATE, UP, HIDDEN, OUT)

#: The ``jax.checkpoint`` policy of the gated layers with ``remat=True``.
GATED_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(GATE, UP)
#: The ``jax.checkpoint`` policy of :class:`FFN` with ``remat=True``.
FFN_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(UP)

_SPLIT_FORM = frozenset(id(ACTIVATIONS[name]) for name in GATED_NAMES)

DotGeneral = Callable[..., Array]


def resolve_activation(activation: Any, layer: str) -> Callable[..., Any]:
  """Resolves a registry name to its function; callables pass unchanged.

  Args:
    activation: a registry name or a callable (a function or a learnable
      activation module).
    layer: the layer's name, for error messages.

  Returns:
    The element-wise activation.

  Raises:
    ValueError: for a name not in the registry (the message lists the valid
      names) or a split-form gated name such as ``'swiglu'``.
    TypeError: if ``activation`` is neither a string nor a callable.
  """
  if not isinstance(activation, str) and not callable(activation):
    raise TypeError(
      f'{layer}: activation must be a registry name or a callable; got'
      f' {activation!r} ({type(activation).__name__}).'
    )
  try:
    fn = get_activation(activation)
  except ValueError as e:
    raise ValueError(f'{layer}: {e}') from None
  if id(fn) in _SPLIT_FORM:
    raise ValueError(
      f'{layer}: activation must be element-wise; got the split-form gated'
      f' function {activation!r}, which halves its input. Use the gated'
      ' layer with its element-wise activation instead (SwiGLU or'
      " GatedFFN(activation='silu'), GeGLU, ReGLU)."
    )
  return fn


def check_features(name: str, value: Any, layer: str) -> int:
  """Returns ``value`` as ``int`` if it is a positive integer, else raises."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(
      f'{layer}: {name} must be a positive integer; got {value!r}'
      f' ({type(value).__name__}).'
    )
  if value <= 0:
    raise ValueError(
      f'{layer}: {name} must be a positive integer; got {value}.'
    )
  return int(value)


def check_dropout(rate: Any, broadcast_dims: Sequence[int], layer: str) -> None:
  """Raises ``ValueError`` unless ``0 <= rate <= 1`` and dims are ints."""
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
    raise ValueError(
      f'{layer}: dropout_rate must be a number in [0, 1]; got {rate!r}.'
    )
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f'{layer}: dropout_rate must be in [0, 1]; got {rate}.')
  if any(
    isinstance(d, bool) or not isinstance(d, numbers.Integral)
    for d in broadcast_dims
  ):
    raise ValueError(
      f'{layer}: dropout_broadcast_dims must be a sequence of ints; got'
      f' {tuple(broadcast_dims)!r}.'
    )


def check_input(x: Any, layer: str, in_features: int | None = None) -> Array:
  """Checks the layer input: floating dtype, rank >= 1, feature size.

  Args:
    x: the layer input, shape ``(..., in_features)``.
    layer: the layer's name, for error messages.
    in_features: the expected size of the last axis, when known.

  Returns:
    ``x`` as a floating-point JAX array.

  Raises:
    TypeError: if ``x`` is not floating point.
    ValueError: if ``x`` is a scalar or its last axis is not ``in_features``.
  """
  dtype = getattr(x, 'dtype', None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{layer}: expected a floating-point input (float32, bfloat16, float16'
      f' or float64); got dtype {np.dtype(dtype).name}. Cast it first, e.g.'
      ' x.astype(jnp.float32).'
    )
  x = as_float_array(x, f'{layer} input')
  if x.ndim < 1:
    raise ValueError(
      f'{layer}: input must have shape (..., features); got a scalar.'
    )
  if in_features is not None and x.shape[-1] != in_features:
    raise ValueError(
      f'{layer}: expected input of shape (..., {in_features}) (in_features='
      f'{in_features}); got shape {tuple(x.shape)} with last dimension'
      f' {x.shape[-1]}.'
    )
  return x


def compute_dtype(x: Array, dtype: Any) -> np.dtype:
  """The layer's compute dtype: ``dtype`` if given, else the input's."""
  return np.dtype(x.dtype if dtype is None else dtype)


def project(
  x: Array,
  kernel: Array,
  bias: Array | None,
  *,
  dtype: Any,
  precision: Any = None,
  dot_general: DotGeneral | None = None,
  preferred_element_type: Any = None,
) -> Array:
  """``x @ kernel + bias`` over the last axis of ``x``, in ``dtype``.

  Args:
    x: input, shape ``(..., in)``.
    kernel: shape ``(in, *out)``: ``(in, out)`` or the fused ``(in, 2, out)``.
    bias: shape ``out`` (``(out,)`` or ``(2, out)``) or ``None``.
    dtype: the dtype ``x``, ``kernel`` and ``bias`` are cast to.
    precision: passed to ``dot_general``.
    dot_general: a function with :func:`jax.lax.dot_general`'s signature
      (the hook quantization libraries such as AQT and Qwix use).
    preferred_element_type: the accumulation and output dtype of the matmul
      (``None``: ``dtype``).

  Returns:
    An array of shape ``(..., *out)``.
  """
  dot = jax.lax.dot_general if dot_general is None else dot_general
  x = x.astype(dtype)
  kernel = kernel.astype(dtype)
  kwargs = {}
  if preferred_element_type is not None:
    kwargs['preferred_element_type'] = preferred_element_type
  y = dot(
    x,
    kernel,
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=precision,
    **kwargs,
  )
  if bias is not None:
    bias = bias.astype(y.dtype)
    y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def dropout(
  h: Array, rate: float, key: Array | None, broadcast_dims: Sequence[int]
) -> Array:
  """Inverted dropout with an optional mask broadcast over some dimensions."""
  if key is None or rate == 0.0:
    return h
  if rate == 1.0:
    return jnp.zeros_like(h)
  keep = 1.0 - rate
  shape = list(h.shape)
  for d in broadcast_dims:
    shape[d] = 1
  mask = jax.random.bernoulli(key, p=keep, shape=tuple(shape))
  mask = jnp.broadcast_to(mask, h.shape)
  return jnp.where(mask, h / jnp.asarray(keep, h.dtype), jnp.zeros_like(h))


def hidden_shape_names(h: Array) -> tuple[Any, ...]:
  """The logical axis names of a hidden activation: ``(..., 'mlp')``.

  Leading axes are left unconstrained, so batch sharding propagates.
  """
  unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED
  return (unconstrained,) * (h.ndim - 1) + ('mlp',)


def gated_body(
  x: Array,
  *,
  gate_up: Callable[[Array], tuple[Array, Array]],
  down: Callable[[Array], Array],
  activation: Callable[[Array], Array],
  parametric: bool,
  constrain: Callable[[Array], Array],
  dropout_rate: float,
  dropout_key: Array | None,
  dropout_broadcast_dims: Sequence[int],
) -> Array:
  """``down(dropout(act(gate) * up))`` with checkpoint names and constraints.

  Args:
    x: input, shape ``(..., in_features)``.
    gate_up: returns the gate and up projections of ``x``.
    down: the down projection.
    activation: element-wise activation of the gate.
    parametric: ``True`` for activations with parameters of their own
      (computed as ``act(gate) * up``); otherwise the lean
      :func:`flaxact.gated_product` is used.
    constrain: sharding constraint for hidden-sized arrays.
    dropout_rate: dropout rate on the hidden activation.
    dropout_key: the dropout key, or ``None`` for no dropout.
    dropout_broadcast_dims: dimensions the dropout mask is shared over.

  Returns:
    The output, shape ``(..., out_features)``.
  """
  gate, up = gate_up(x)
  gate = checkpoint_name(constrain(gate), GATE)
  up = checkpoint_name(constrain(up), UP)
  if parametric:
    h = (activation(gate) * up).astype(gate.dtype)
  else:
    h = gated_product(gate, up, activation)
  h = checkpoint_name(constrain(h), HIDDEN)
  h = dropout(h, dropout_rate, dropout_key, dropout_broadcast_dims)
  return checkpoint_name(down(h), OUT)


def ffn_body(
  x: Array,
  *,
  up: Callable[[Array], Array],
  down: Callable[[Array], Array],
  activation: Callable[[Array], Array],
  constrain: Callable[[Array], Array],
  dropout_rate: float,
  dropout_key: Array | None,
  dropout_broadcast_dims: Sequence[int],
) -> Array:
  """``down(dropout(act(up(x))))`` with checkpoint names and constraints."""
  u = checkpoint_name(constrain(up(x)), UP)
  h = activation(u).astype(u.dtype)
  h = checkpoint_name(constrain(h), HIDDEN)
  h = dropout(h, dropout_rate, dropout_key, dropout_broadcast_dims)
  return checkpoint_name(down(h), OUT)


def fused_kernel_init(init: Callable[..., Array]) -> Callable[..., Array]:
  """Initialises a fused ``(embed, 2, mlp)`` kernel as two ``(embed, mlp)``.

  Each half is drawn by ``init`` with its own key and the shape of an
  unfused kernel, so variance-scaling initialisers see the same fans as for
  separate ``gate_proj`` and ``up_proj`` kernels.
  """

  def init_fused(key: Array, shape: Sequence[int], dtype: Any = jnp.float32):
    embed, two, mlp = shape
    if two != 2:
      raise ValueError(
        f'fused kernel shape must be (embed, 2, mlp); got {shape}.'
      )
    k_gate, k_up = jax.random.split(key)
    return jnp.stack(
      [init(k_gate, (embed, mlp), dtype), init(k_up, (embed, mlp), dtype)],
      axis=1,
    )

  return init_fused


def elementwise_dtype(dtype: np.dtype, in_float32: bool) -> Any:
  """The matmul output dtype of ``gate_proj``/``up_proj``: ``None`` = dtype.

  With ``in_float32`` and a half-precision ``dtype`` the projections return
  float32, so the pre-activations, the activation, the product and dropout
  run in float32 and the hidden activation is rounded once, when it is cast
  to ``dtype`` for ``down_proj``.
  """
  if in_float32 and np.dtype(dtype).itemsize < 4:
    return jnp.float32
  return None


def split_fused(y: Array) -> tuple[Array, Array]:
  """Splits a fused projection ``(..., 2, mlp)`` into ``(gate, up)``."""
  return y[..., 0, :], y[..., 1, :]
