"""The two-array gated product of the FFN layers: ``act(gate) * up``.

Separate from the split-form functions of :mod:`flaxact._src.activations.gated`
because it takes activation names, so it imports the registry, and the registry
imports the split-form functions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.typing import ArrayLike

from flaxact._src.activations.gated import apply_gated
from flaxact._src.activations.registry import get_activation
from flaxact._src.common.checks import as_float_array, check_same_shape

Array = jax.Array


def gated_product(
  gate: ArrayLike,
  up: ArrayLike,
  activation: str | Callable[[Array], Array] = 'silu',
) -> Array:
  r"""The gated product of a gated FFN, ``activation(gate) * up``.

  .. math::
    \mathrm{gated\_product}(g, u) = \mathrm{act}(g) \odot u

  The backward pass keeps two hidden-sized residuals (``act'(gate) * up`` and
  ``act(gate)``) instead of the five that autodiff of ``silu(gate) * up``
  keeps. Forward mode (``jax.jvp``), ``grad`` of ``grad``, ``vmap`` and
  ``jit`` all work. Half-precision inputs are computed in float32 and rounded
  once.

  Args:
    gate: gate pre-activation, shape ``(..., d)``, floating dtype.
    up: value ("up") projection, the same shape and dtype as ``gate``.
    activation: a registry name (``'silu'``, ``'gelu'``, ``'relu'``, ...) or
      an element-wise callable without parameters of its own. For activations
      with learnable parameters multiply directly instead.

  Returns:
    ``activation(gate) * up``, shape ``(..., d)``, the dtype of the inputs.

  Raises:
    ValueError: if ``gate`` and ``up`` have different shapes, or the name is
      not registered.
    TypeError: if the inputs are not floating point or their dtypes differ.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> gate = jnp.array([0.0, 1.0, -30.0])
    >>> up = jnp.array([2.0, 2.0, 2.0])
    >>> flaxact.gated_product(gate, up, 'relu')
    Array([0., 2., 0.], dtype=float32)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202

  See also:
    :func:`swiglu` and the other split-form functions.
  """
  gate = as_float_array(gate, 'gate')
  up = as_float_array(up, 'up')
  check_same_shape(gate, up)
  if gate.dtype != up.dtype:
    raise TypeError(
      f'gate and up must have the same dtype; got gate {gate.dtype.name} and'
      f' up {up.dtype.name}.'
    )
  return apply_gated(get_activation(activation), gate, up)
