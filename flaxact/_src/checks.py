"""Input checks and the compute-dtype rule shared by every activation.

Every public function in flaxact takes floating-point input and returns the
input's dtype. Half-precision inputs (``bfloat16``, ``float16``) are computed
in ``float32`` and rounded once at the end, so that intermediates cannot
overflow (``exp(12)`` is already past ``float16``'s maximum) and the result is
within one unit in the last place of the correctly rounded value.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
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
  choices = sorted(choices)
  key = value.strip().lower().replace('-', '_')
  if key not in choices:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ValueError(
      f'unknown {kind} {value!r}.{hint} Valid {plural}:'
      f' {", ".join(map(repr, choices))}.'
    )
  return key
