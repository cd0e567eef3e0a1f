"""The name registry: ``get_activation`` and ``ACTIVATIONS``.

Names follow flaxact's own function names plus the Hugging Face ``ACT2FN``
names with their Hugging Face semantics (``"gelu"`` is the exact GELU,
``"gelu_new"`` the tanh form) and PyTorch's module names (``"hardswish"``).
Look-ups ignore case and treat ``-`` and ``_`` alike.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from flaxact._src.activations import (
  exponential,
  gated,
  gelu,
  piecewise,
  sigmoid,
  swish,
)
from flaxact._src.activations.gelu import gelu_10
from flaxact._src.activations.laplace import laplace
from flaxact._src.activations.sigmoid import sqrt_softplus
from flaxact._src.common.checks import normalise_choice

_CANONICAL: dict[str, Callable[..., Any]] = {
  # element-wise
  'relu': piecewise.relu,
  'relu6': piecewise.relu6,
  'leaky_relu': piecewise.leaky_relu,
  'relu_squared': piecewise.relu_squared,
  'hard_sigmoid': piecewise.hard_sigmoid,
  'hard_silu': piecewise.hard_silu,
  'identity': piecewise.identity,
  'elu': exponential.elu,
  'selu': exponential.selu,
  'celu': exponential.celu,
  'sigmoid': sigmoid.sigmoid,
  'tanh': sigmoid.tanh,
  'softplus': sigmoid.softplus,
  'silu': swish.silu,
  'swish': swish.swish,
  'quick_gelu': swish.quick_gelu,
  'mish': swish.mish,
  'gelu': gelu.gelu,
  'gelu_tanh': gelu.gelu_tanh,
  'gelu_10': gelu_10,
  'sqrt_softplus': sqrt_softplus,
  'laplace': laplace,
  # split-form gated
  'glu': gated.glu,
  'reglu': gated.reglu,
  'geglu': gated.geglu,
  'geglu_tanh': gated.geglu_tanh,
  'swiglu': gated.swiglu,
  'bilinear': gated.bilinear,
}

# Other libraries' names, with those libraries' semantics.
_ALIASES: dict[str, str] = {
  'gelu_python': 'gelu',  # Hugging Face: exact
  'gelu_new': 'gelu_tanh',  # Hugging Face
  'gelu_pytorch_tanh': 'gelu_tanh',  # Hugging Face
  'gelu_fast': 'gelu_tanh',  # Hugging Face
  'gelu_accurate': 'gelu_tanh',  # Hugging Face: the same tanh formula
  'gelu_python_tanh': 'gelu_tanh',  # Hugging Face: the same tanh formula
  'sqrtsoftplus': 'sqrt_softplus',  # Hugging Face
  'relu2': 'relu_squared',  # Hugging Face
  'squared_relu': 'relu_squared',
  'linear': 'identity',  # Hugging Face
  'hardswish': 'hard_silu',  # PyTorch
  'hard_swish': 'hard_silu',  # jax.nn
  'hardsigmoid': 'hard_sigmoid',  # PyTorch
  'leakyrelu': 'leaky_relu',  # PyTorch module name
}

#: Every registered name (canonical and alias) mapped to its function.
ACTIVATIONS: Mapping[str, Callable[..., Any]] = types.MappingProxyType(
  {**_CANONICAL, **{a: _CANONICAL[c] for a, c in _ALIASES.items()}}
)

#: The split-form gated names: each halves its input along ``axis``.
GATED_NAMES: frozenset[str] = frozenset(
  {'glu', 'reglu', 'geglu', 'geglu_tanh', 'swiglu', 'bilinear'}
)


def get_activation(
  name: str | Callable[..., Any], **params: Any
) -> Callable[..., Any]:
  """Returns the activation registered under ``name``.

  Names are matched ignoring case and ``-`` versus ``_``. Hugging Face
  ``ACT2FN`` names keep their Hugging Face meaning: ``"gelu"`` is the exact
  GELU; ``"gelu_new"``, ``"gelu_pytorch_tanh"``, ``"gelu_fast"`` the tanh
  form; ``"relu2"`` squared ReLU; ``"silu"`` and ``"swish"`` SiLU; ``"linear"``
  the identity. Split-form gated names (``"swiglu"``, ...) return the
  split-form function.

  Parameterised activations are configured with keyword arguments, which
  return a ``functools.partial``: ``get_activation('leaky_relu',
  negative_slope=0.2)``, ``get_activation('swish', beta=1.702)``,
  ``get_activation('elu', alpha=0.5)``, ``get_activation('swiglu', axis=0)``.

  Args:
    name: a registered name, or a callable, which is returned unchanged (so
      layers can take either).
    **params: keyword parameters of the activation (see its signature).

  Returns:
    The activation function, with ``params`` bound if any were given.

  Raises:
    ValueError: if ``name`` is not registered; the message lists the valid
      names and the closest match.
    TypeError: if ``name`` is neither a string nor a callable, or a parameter
      is not one the activation takes.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.get_activation('GELU-new') is flaxact.gelu_tanh
    True
    >>> act = flaxact.get_activation('leaky_relu', negative_slope=0.5)
    >>> act(jnp.array([-2.0, 2.0]))
    Array([-1.,  2.], dtype=float32)
  """
  if callable(name):
    if params:
      return functools.partial(name, **params)
    return name
  if not isinstance(name, str):
    raise TypeError(
      'activation must be a registered name or a callable; got'
      f' {type(name).__name__}.'
    )
  key = normalise_choice(name, ACTIVATIONS, 'activation', 'names')
  fn = ACTIVATIONS[key]
  if not params:
    return fn
  accepted = list(inspect.signature(fn).parameters)[1:]
  unknown = sorted(set(params) - set(accepted))
  if unknown:
    raise TypeError(
      f'activation {name!r} takes parameters {accepted or "none"}; got'
      f' unexpected {unknown}.'
    )
  return functools.partial(fn, **params)
