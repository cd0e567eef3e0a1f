r"""The logistic family: sigmoid, tanh and softplus.

All three share one kernel, :func:`sigmoid_parts`, that computes
:math:`\sigma(x)` and :math:`\sigma'(x)` from a single ``sigmoid(-|x|)``. This
form is accurate in both tails (no ``1 - \sigma`` cancellation), never
overflows, and makes the derivatives at ``±inf`` exactly 0. ``sigmoid`` itself
is ``lax.logistic`` in float32, its derivative formed from its value,
``y (1 - y)``, as ``jax.nn`` does (half precision keeps the shared kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flaxact._src.common.checks import apply_elementwise, as_float_array
from flaxact._src.common.derivative import (
  with_derivative,
  with_output_derivative,
)

Array = jax.Array


def sigmoid_parts(x: Array) -> tuple[Array, Array]:
  r"""Returns ``(sigmoid(x), sigmoid'(x))`` from one logistic of ``-|x|``.

  With :math:`t = \sigma(-|x|) \in [0, 1/2]`: :math:`\sigma(x) = 1 - t` for
  :math:`x \ge 0`, :math:`t` otherwise, and :math:`\sigma'(x) = t (1 - t)`.
  ``1 - t`` never cancels (``t <= 1/2``), so both tails keep full relative
  accuracy, and the single transcendental intermediate lets XLA compute the
  forward value and the derivative from one materialised array.
  """
  t = jax.lax.logistic(-jnp.abs(x))
  return jnp.where(x >= 0, 1 - t, t), t - t * t


def times_with_zero_limit(x: Array, s: Array) -> Array:
  """Returns ``x * s`` for an ``s`` that tends to 0 as ``x -> -inf``.

  At ``x = -inf`` the result is the limit 0, not ``-inf * 0 = NaN``.
  """
  return jnp.where(x == -jnp.inf, jnp.zeros_like(x), x * s)


# float32 and float64: the value is lax.logistic (1 / (1 + exp(-x)), as
# jax.nn.sigmoid; within 2.5 ulp in float32, accurate in the lower tail and
# rounding to 1 in the upper one) and the derivative y (1 - y) is formed from
# it, so the backward pass does no second logistic. The derivative's absolute
# error stays below 1e-7 in float32 (its relative accuracy in the upper tail,
# where y rounds to 1, is lost: the derivative there is below 6e-8).
sigmoid_kernel = with_output_derivative(jax.lax.logistic, lambda y: y * (1 - y))
# Half precision computes in float32 and returns the rounded value: the
# float32 value is not an output, so keeping it for the backward pass would
# materialise it. The derivative is recomputed from x instead.
_sigmoid_recomputed = with_derivative(
  lambda x: sigmoid_parts(x)[0], lambda x: sigmoid_parts(x)[1]
)

_softplus = with_derivative(
  lambda x: jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x))),
  lambda x: sigmoid_parts(x)[0],
)

# tanh'(x) = 4 sigmoid(2x) sigmoid(-2x): accurate in both tails, where the
# textbook 1 - tanh(x)**2 cancels to 0 once tanh(x) rounds to 1.
_tanh = with_derivative(jnp.tanh, lambda x: 4 * sigmoid_parts(2 * x)[1])


def sigmoid(x: Any) -> Array:
  r"""Logistic sigmoid.

  .. math::
    \sigma(x) = \frac{1}{1 + e^{-x}}

  Accurate to float32 rounding in both tails (``sigmoid(-80.)`` is
  ``1.8e-35``, not 0); ``sigmoid(±inf)`` is 1 or 0 with derivative 0. In
  float32 the derivative is formed from the value, ``y (1 - y)``, as in
  ``jax.nn``: its absolute error is below 1e-7, and it is 0 once ``y``
  rounds to 1 (``x > 16.6``, where it is below 6e-8).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, in [0, 1].

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.sigmoid(jnp.array([-jnp.inf, 0.0, jnp.inf]))
    Array([0. , 0.5, 1. ], dtype=float32)

  See also:
    :func:`hard_sigmoid`, :func:`silu`.
  """
  x = as_float_array(x)
  half = x.dtype in (jnp.bfloat16, jnp.float16)
  return apply_elementwise(_sigmoid_recomputed if half else sigmoid_kernel, x)


def tanh(x: Any) -> Array:
  r"""Hyperbolic tangent.

  .. math::
    \tanh(x) = \frac{e^x - e^{-x}}{e^x + e^{-x}}

  Half-precision inputs are computed in float32 and rounded once.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, in [-1, 1].

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.tanh(jnp.array([-jnp.inf, 0.0, jnp.inf]))
    Array([-1.,  0.,  1.], dtype=float32)
  """
  return apply_elementwise(_tanh, x)


def softplus(x: Any) -> Array:
  r"""Softplus, a smooth ReLU.

  .. math::
    \mathrm{softplus}(x) = \log(1 + e^x) = \max(x, 0) + \log(1 + e^{-|x|})

  Computed in the right-hand form, which never overflows: ``softplus(1e4)`` is
  ``1e4`` in every dtype, and the derivative :math:`\sigma(x)` is 1 at
  ``+inf`` and 0 at ``-inf``. PyTorch switches to the identity above
  ``x = 20`` (its ``threshold``); flaxact keeps the exact value, which differs
  from it by less than float32 rounding.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, non-negative.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.softplus(jnp.array([0.0, 1e4], dtype=jnp.bfloat16))
    Array([0.691406, 9984], dtype=bfloat16)

  References:
    Dugas et al., "Incorporating Second-Order Functional Knowledge for Better
    Option Pricing", NeurIPS 2000.
  """
  return apply_elementwise(_softplus, x)
