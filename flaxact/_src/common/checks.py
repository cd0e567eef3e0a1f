"""Input checks and the compute-dtype rule shared by every activation.

Every public function in flaxact takes floating-point input and returns the
input's dtype. Half-precision inputs (``bfloat16``, ``float16``) are computed
in ``float32`` and rounded once at the end, so that intermediates cannot
overflow (``exp(12)`` is already past ``float16``'s maximum) and the result is
within one unit in the last place of the correctly rounded value.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def as_float_array(x: Any, name: str = 'x') -> Array:
  """Returns ``x`` as a floating-point JAX array, or raises ``TypeError``.

  Python ``int`` and ``float`` scalars become weakly typed floats (as
  ``jnp.asarray(1.0)``); arrays must already have a floating dtype.

  Args:
    x: an array or a Python scalar.
    name: the argument's name, used in the error message.

  Returns:
    ``x`` as a JAX array of floating dtype.

  Raises:
    TypeError: if ``x`` is not floating point (integers, booleans, complex).
  """
  if isinstance(x, (int, float)) and not isinstance(x, bool):
    return jnp.asarray(float(x))
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    x = jnp.asarray(x)
    dtype = x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{name} must be a floating-point array (float32, bfloat16, float16 or'
      f' float64); got dtype {np.dtype(dtype).name}. Cast it first, e.g.'
      f' {name}.astype(jnp.float32).'
    )
  return jnp.asarray(x)


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype element-wise math runs in: ``float32`` for half precision."""
  dtype = np.dtype(dtype)
  return np.dtype(jnp.float32) if dtype in _HALF_DTYPES else dtype


def apply_elementwise(
  core: Callable[..., Array], x: Any, *params: Any
) -> Array:
  """Applies a same-dtype kernel with checks and the compute-dtype rule.

  Validates ``x``, casts it (and any array-valued parameters) to
  :func:`compute_dtype`, calls ``core`` and rounds the result back to the input
  dtype once.

  Args:
    core: ``core(x, *params)`` computing in the dtype of ``x``.
    x: the input array.
    *params: the activation's parameters (slope, alpha, beta).

  Returns:
    ``core(x, *params)`` in the dtype of ``x``.
  """
  x = as_float_array(x)
  ctype = compute_dtype(x.dtype)
  params = tuple(cast_param(p, ctype) for p in params)
  return core(x.astype(ctype), *params).astype(x.dtype)


def cast_param(p: Any, dtype: np.dtype) -> Any:
  """Casts an activation parameter (slope, alpha, beta) to ``dtype``.

  Python scalars stay Python scalars (weakly typed), so they never promote the
  computation; arrays are cast, so a ``float32`` parameter applied to a
  ``bfloat16`` input still computes in ``float32`` and returns ``bfloat16``.
  """
  if isinstance(p, (int, float)) and not isinstance(p, bool):
    return float(p)
  p = as_float_array(p, 'parameter')
  return p.astype(dtype)


def check_same_shape(gate: Array, up: Array) -> None:
  """Raises ``ValueError`` unless ``gate`` and ``up`` have equal shapes."""
  if gate.shape != up.shape:
    raise ValueError(
      'gate and up must have the same shape; got gate'
      f' {tuple(gate.shape)} and up {tuple(up.shape)}.'
    )


def split_halves(x: Array, axis: int) -> tuple[Array, Array]:
  """Splits ``x`` into two equal halves along ``axis``.

  Raises:
    ValueError: if ``axis`` is out of range or its size is odd.
  """
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(
      f'axis {axis} is out of range for an input of shape {tuple(x.shape)}'
      f' (rank {x.ndim}).'
    )
  size = x.shape[axis]
  if size % 2:
    raise ValueError(
      f'the size of axis {axis} must be even to split into (value, gate)'
      f' halves; got {size} in shape {tuple(x.shape)}.'
    )
  a, b = jnp.split(x, 2, axis=axis)
  return a, b


def normalise_choice(
  value: str, choices: Iterable[str], kind: str, plural: str
) -> str:
  """Matches ``value`` to ``choices`` ignoring case and ``-`` versus ``_``.

  Args:
    value: the name given.
    choices: the valid (normalised) names.
    kind: what a name is, for the message (``'activation'``, ``'layout'``).
    plural: the heading of the list of valid names (``'names'``).

  Returns:
    The normalised name, one of ``choices``.

  Raises:
    ValueError: if no choice matches; the message names the closest match
      and lists every valid name.
  """
  return match_choice(value, {f'Valid {plural}': choices}, kind)[0]


def match_choice(
  value: Any, groups: Mapping[str, Iterable[str]], kind: str
) -> tuple[str, str]:
  """Matches ``value`` to the names of several groups (see above).

  Args:
    value: the name given; case and ``-`` versus ``_`` are ignored.
    groups: each group's heading (for the message) and its valid names.
    kind: what a name is, for the message.

  Returns:
    ``(name, heading)``: the normalised name and its group's heading.

  Raises:
    ValueError: if no name of any group matches; the message names the
      closest match and lists every group's names under its heading.
  """
  key = (
    value.strip().lower().replace('-', '_') if isinstance(value, str) else ''
  )
  for heading, names in groups.items():
    if key in set(names):
      return key, heading
  sorted_groups = {h: sorted(names) for h, names in groups.items()}
  every = [n for names in sorted_groups.values() for n in names]
  close = difflib.get_close_matches(key, every, n=1) if key else []
  hint = f' Did you mean {close[0]!r}?' if close else ''
  lists = '; '.join(
    f'{heading}: {", ".join(map(repr, names))}'
    for heading, names in sorted_groups.items()
  )
  raise ValueError(f'unknown {kind} {value!r}.{hint} {lists}.')


def check_positive_int(value: Any, name: str, owner: str | None = None) -> int:
  """Returns ``value`` as ``int`` if it is a positive integer, else raises.

  The one positive-integer check of flaxact: layer widths, the hidden-width
  rule's arguments and the learnable activations' ``num_parameters``.

  Args:
    value: the value given.
    name: the argument's name, for the message.
    owner: the layer or function the argument belongs to, for the message.

  Returns:
    ``value`` as a Python ``int``.

  Raises:
    ValueError: if ``value`` is not an integer (``bool`` included) or is not
      positive.

  Examples:
    >>> check_positive_int(3, 'hidden_features')
    3
    >>> check_positive_int(0, 'hidden_features', 'SwiGLU')
    Traceback (most recent call last):
      ...
    ValueError: SwiGLU: hidden_features must be a positive integer; got 0.
  """
  prefix = f'{owner}: ' if owner else ''
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(
      f'{prefix}{name} must be a positive integer; got {value!r}'
      f' ({type(value).__name__}).'
    )
  if value <= 0:
    raise ValueError(f'{prefix}{name} must be a positive integer; got {value}.')
  return int(value)


def check_dropout(
  rate: Any, broadcast_dims: Sequence[int], owner: str
) -> tuple[float, tuple[int, ...]]:
  """Checks a dropout rate in ``[0, 1]`` and integer broadcast dimensions.

  Args:
    rate: the dropout rate given.
    broadcast_dims: the dimensions one dropout mask is shared over.
    owner: the layer's name, for the message.

  Returns:
    ``(float(rate), tuple(broadcast_dims))``.

  Raises:
    ValueError: if ``rate`` is not a number in ``[0, 1]`` or a dimension is
      not an integer.
  """
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
    raise ValueError(
      f'{owner}: dropout_rate must be a number in [0, 1]; got {rate!r}.'
    )
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f'{owner}: dropout_rate must be in [0, 1]; got {rate}.')
  dims = tuple(broadcast_dims)
  if any(
    isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims
  ):
    raise ValueError(
      f'{owner}: dropout_broadcast_dims must be a sequence of ints; got'
      f' {dims!r}.'
    )
  return float(rate), dims


def check_layer_input(
  x: Any, owner: str, in_features: int | None = None
) -> Array:
  """Checks a layer input: floating dtype, rank >= 1, last-axis size.

  Args:
    x: the layer input, shape ``(..., in_features)``.
    owner: the layer's name, for the message.
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
      f'{owner}: expected a floating-point input (float32, bfloat16, float16'
      f' or float64); got dtype {np.dtype(dtype).name}. Cast it first, e.g.'
      ' x.astype(jnp.float32).'
    )
  x = as_float_array(x, f'{owner} input')
  if x.ndim < 1:
    raise ValueError(
      f'{owner}: input must have shape (..., features); got a scalar.'
    )
  if in_features is not None and x.shape[-1] != in_features:
    raise ValueError(
      f'{owner}: expected input of shape (..., {in_features}) (in_features='
      f'{in_features}); got shape {tuple(x.shape)} with last dimension'
      f' {x.shape[-1]}.'
    )
  return x
