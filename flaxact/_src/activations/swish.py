"""Self-gated activations: SiLU, Swish, QuickGELU and Mish.

Each has a hand-written derivative that reuses the forward pass's single
exponential, returns the exact limits at ``±inf`` (values 0 or ``x``,
derivatives 0 or 1) and keeps one residual for the backward pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from flaxact._src.activations.sigmoid import (
  sigmoid_parts,
  times_with_zero_limit,
)
from flaxact._src.common.checks import apply_elementwise
from flaxact._src.common.derivative import copy_behind_barrier, with_derivative

Array = jax.Array

QUICK_GELU_BETA = 1.702


def finite_or_zero(x: Array) -> Array:
  """``x`` with ``±inf`` replaced by 0 (NaN kept), for ``x * (-> 0)`` terms."""
  return jnp.where(jnp.isinf(x), jnp.zeros_like(x), x)


def _silu_derivative(x: Array) -> Array:
  s, ds = sigmoid_parts(x)
  return s + finite_or_zero(x) * ds


silu_kernel = with_derivative(
  lambda x: times_with_zero_limit(x, sigmoid_parts(x)[0]), _silu_derivative
)


def _swish(x: Array, beta: Any) -> Array:
  if isinstance(beta, float) and beta == 1.0:
    return silu_kernel(x)
  return _swish_beta(x, jnp.asarray(beta, x.dtype))


def _swish_parts(x: Array, beta: Array) -> tuple[Array, Array, Array]:
  s, ds = sigmoid_parts(beta * x)
  y = jnp.where(jnp.isinf(x) & (s == 0), jnp.zeros_like(x), x * s)
  return y, s, ds


@jax.custom_jvp
def _swish_beta(x: Array, beta: Array) -> Array:
  return _swish_parts(x, beta)[0]


def _swish_beta_jvp(primals, tangents):
  x, beta = primals
  t_x, t_beta = tangents
  y = _swish_parts(x, beta)[0]
  xb = copy_behind_barrier(x)
  _, s, ds = _swish_parts(xb, beta)
  xf = finite_or_zero(xb)
  dy = jnp.zeros_like(y)
  if not isinstance(t_x, SymbolicZero):
    dy = dy + (s + beta * xf * ds) * t_x
  if not isinstance(t_beta, SymbolicZero):
    dy = dy + (xf * xf * ds) * t_beta
  return y, dy


_swish_beta.defjvp(_swish_beta_jvp, symbolic_zeros=True)


def _mish_parts(x: Array) -> tuple[Array, Array]:
  # tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): no cancellation in
  # either tail. It is exactly 1 in float32 and float64 once x >= 20, and the
  # derivative's second term is exactly 0 past the clip bounds. Value and
  # derivative each do their own division, so the exponential is the only
  # intermediate they share (XLA then materialises one array, not three).
  xc = jnp.clip(x, -800.0, 20.0)
  e = jnp.exp(xc)
  n = e * (e + 2)
  d = n + 2
  dy = (n * d + 4 * xc * e * (1 + e)) / (d * d)
  return times_with_zero_limit(x, n / d), dy


_mish = with_derivative(
  lambda x: _mish_parts(x)[0], lambda x: _mish_parts(x)[1]
)


def silu(x: ArrayLike) -> Array:
  r"""Sigmoid linear unit, also called Swish-1.

  .. math::
    \mathrm{silu}(x) = x \, \sigma(x)

  Accurate in the negative tail in every dtype: ``silu(-12)`` in float16 is
  ``-7.4e-5``, where ``jax.nn.silu`` returns 0 because ``exp(12)`` overflows
  float16. ``silu(-inf) = 0`` and ``silu'(±inf)`` is 0 or 1.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.silu(jnp.array([-jnp.inf, 0.0, jnp.inf]))
    Array([ 0.,  0., inf], dtype=float32)

  References:
    Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016;
    Elfwing, Uchibe & Doya, "Sigmoid-Weighted Linear Units", 2017;
    Ramachandran, Zoph & Le, "Searching for Activation Functions", 2017.

  See also:
    :func:`swish`, :func:`swiglu`.
  """
  return apply_elementwise(silu_kernel, x)


def swish(x: ArrayLike, beta: ArrayLike = 1.0) -> Array:
  r"""Swish with a slope parameter.

  .. math::
    \mathrm{swish}(x) = x \, \sigma(\beta x)

  ``beta`` may be an array (the learnable Swish layer passes one) and is
  differentiable. With ``beta = 1`` this is :func:`silu`.

  Args:
    x: input array of any shape and floating dtype.
    beta: the slope :math:`\beta`, a scalar or an array broadcastable to
      ``x``.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.swish(jnp.array([0.0, 2.0]), beta=0.0)
    Array([0., 1.], dtype=float32)

  References:
    Ramachandran, Zoph & Le, "Searching for Activation Functions", 2017.
    https://arxiv.org/abs/1710.05941
  """
  return apply_elementwise(_swish, x, beta)


def quick_gelu(x: ArrayLike) -> Array:
  r"""The sigmoid approximation of GELU used by CLIP.

  .. math::
    \mathrm{quick\gelu_kernel}(x) = x \, \sigma(1.702 x)

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.quick_gelu(jnp.array([0.0, 20.0]))
    Array([ 0., 20.], dtype=float32)

  References:
    Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016, section 2.
  """
  return apply_elementwise(_swish, x, QUICK_GELU_BETA)


def mish(x: ArrayLike) -> Array:
  r"""Mish, a self-regularised non-monotonic activation.

  .. math::
    \mathrm{mish}(x) = x \tanh(\mathrm{softplus}(x))

  Computed as :math:`x\, n / (n + 2)` with :math:`n = e^x (e^x + 2)`: one
  exponential, no overflow for large ``x`` and no cancellation for negative
  ``x``. ``mish(-inf) = 0``, ``mish(inf) = inf``, derivatives 0 and 1.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.mish(jnp.array([-jnp.inf, 0.0, 30.0]))
    Array([ 0.,  0., 30.], dtype=float32)

  References:
    Misra, "Mish: A Self Regularized Non-Monotonic Activation Function",
    BMVC 2020. https://arxiv.org/abs/1908.08681
  """
  return apply_elementwise(_mish, x)
