r"""The logistic family: sigmoid, tanh and softplus.

All three share one kernel, :func:`sigmoid_parts`, that computes
:math:`\sigma(x)` and :math:`\sigma'(x)` from a single ``sigmoid(-|x|)``. This
form is accurate in both tails (no ``1 - \sigma`` cancellation), never
overflows, and makes the derivatives at ``±inf`` exactly 0. ``sigmoid`` itself
is ``lax.logistic`` in float32, its derivative formed from its value,
``y (1 - y)``, as ``jax.nn`` does (half precision keeps the shared kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

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


def sigmoid(x: ArrayLike) -> Array:
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


def tanh(x: ArrayLike) -> Array:
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


def softplus(x: ArrayLike) -> Array:
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


# --- sqrt_softplus -----------------------------------------------------------
# For x <= 0, with t = e^x: sqrt(log1p(t)) = e^(x/2) sqrt(r), r = log1p(t)/t,
# which keeps full relative accuracy where softplus itself underflows
# (x < -104 in float32, while e^(x/2) lives down to x = -207). r = 1 - t/2
# (error t^2/3) where t is tiny, also avoiding 0/0.
def _sqrt_ratio(x: Array) -> tuple[Array, Array, Array]:
  """``(e^(x/2), sqrt(r), t)`` at ``min(x, 0)``; see the comment above."""
  xn = jnp.minimum(x, 0)
  t = jnp.exp(xn)
  small = t < 1e-4
  ts = jnp.where(small, jnp.ones_like(t), t)
  r = jnp.where(small, 1 - t / 2, jnp.log1p(ts) / ts)
  return jnp.exp(xn / 2), jnp.sqrt(r), t


def _sqrt_softplus_value(x: Array) -> Array:
  half, sqrt_r, _ = _sqrt_ratio(x)
  xp = jnp.maximum(x, 0)
  positive = jnp.sqrt(xp + jnp.log1p(jnp.exp(-xp)))
  return jnp.where(x > 0, positive, half * sqrt_r)


def _sqrt_softplus_derivative(x: Array) -> Array:
  # d/dx sqrt(softplus(x)) = sigmoid(x) / (2 sqrt(softplus(x))); for x <= 0
  # that is e^(x/2) / (2 (1 + t) sqrt(r)), 0 (not 0/0) at -inf.
  half, sqrt_r, t = _sqrt_ratio(x)
  xp = jnp.maximum(x, 0)
  positive = sigmoid_parts(xp)[0] / (2 * jnp.sqrt(xp + jnp.log1p(jnp.exp(-xp))))
  return jnp.where(x > 0, positive, half / (2 * (1 + t) * sqrt_r))


_sqrt_softplus = with_derivative(
  _sqrt_softplus_value, _sqrt_softplus_derivative
)


def sqrt_softplus(x: ArrayLike) -> Array:
  r"""Square root of softplus (Hugging Face ``"sqrtsoftplus"``).

  .. math::
    \mathrm{sqrt\_softplus}(x) = \sqrt{\log(1 + e^x)}

  DeepSeek-V4's router score. Computed as :math:`e^{x/2}\sqrt{\log(1+t)/t}`
  (:math:`t = e^x`) for :math:`x \le 0`, so the negative tail keeps full
  relative accuracy where softplus itself underflows (``x < -104`` in
  float32). The derivative :math:`\sigma(x) / (2 \sqrt{\mathrm{softplus}(x)})`
  is 0 at ``±inf``. Hugging Face applies PyTorch's softplus, which returns
  ``x`` above 20; the difference is below float32 rounding.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, non-negative.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.sqrt_softplus(jnp.array([-150.0, 0.0, 16.0]))
    Array([2.678637e-33, 8.325546e-01, 4.000000e+00], dtype=float32)

  See also:
    :func:`softplus`.
  """
  return apply_elementwise(_sqrt_softplus, x)
