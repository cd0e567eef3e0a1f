"""Gaussian error linear units: the exact (erf) form, the tanh form, gelu_10.

**``flaxact.gelu`` defaults to the exact form**, as PyTorch, Hugging Face
(``"gelu"``) and the GELU paper do. ``jax.nn.gelu`` (and so MaxText and T5X
``"gelu"``) defaults to the tanh approximation; use :func:`gelu_tanh` or
``gelu(x, approximate=True)`` for that.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flaxact._src.activations.sigmoid import (
  sigmoid_parts,
  times_with_zero_limit,
)
from flaxact._src.common.checks import apply_elementwise
from flaxact._src.common.derivative import with_derivative
from flaxact._src.common.float32 import product_error, split_constant

Array = jax.Array

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
# tanh(u) form rewritten as x * sigmoid(2u), 2u = x * (_A + _B * x**2).
_A = 2 * math.sqrt(2 / math.pi)
_B = _A * 0.044715
# Beyond |x| = 40 every Gaussian tail term is exactly 0 in float32 and
# float64, so clipping there changes no result and keeps x**2 finite.
_CLIP = 40.0
#: ``gelu_10`` clips GELU to ``[-GELU_CLIP, GELU_CLIP]``.
GELU_CLIP = 10.0

# 1/sqrt(2) as a float32 with its 12-bit split and the exact remainder, for
# the error-free product in normal_cdf_pdf.
_C = split_constant(_INV_SQRT2)


def normal_cdf_pdf(x: Array) -> tuple[Array, Array]:
  r"""The standard normal CDF and density at ``x``.

  :math:`\Phi(x) = \mathrm{erfc}(-x/\sqrt 2)/2` and
  :math:`\varphi(x) = e^{-z^2}/\sqrt{2\pi}` with :math:`z = -x/\sqrt 2`,
  written on the same ``z`` as erfc's argument so that XLA shares erfc's own
  ``exp(-z*z)`` with the density (one exponential for value and derivative).

  In float32, rounding ``z`` costs a relative error of about ``2 z**2`` ulp in
  the lower tail; the exact rounding error ``delta`` is recovered with an
  error-free product and applied to first order,
  ``erfc(z + delta) ~= erfc(z) (1 - 2 z delta)``.
  """
  xc = jnp.clip(x, -_CLIP, _CLIP)
  z = -xc * _INV_SQRT2
  cdf = 0.5 * jax.lax.erfc(z)
  pdf = _INV_SQRT_2PI * jnp.exp(-(z * z))
  if x.dtype == np.float32:
    delta = -(product_error(xc, _C) + xc * _C.rest)
    cdf = jnp.where(z > 0, cdf * (1 - 2 * z * delta), cdf)
  return cdf, pdf


def _gelu_derivative(x: Array) -> Array:
  cdf, pdf = normal_cdf_pdf(x)
  return cdf + jnp.clip(x, -_CLIP, _CLIP) * pdf


gelu_kernel = with_derivative(
  lambda x: times_with_zero_limit(x, normal_cdf_pdf(x)[0]), _gelu_derivative
)


def _gelu_tanh_parts(x: Array) -> tuple[Array, Array]:
  xc = jnp.clip(x, -_CLIP, _CLIP)
  x2 = xc * xc
  s, ds = sigmoid_parts(xc * (_A + _B * x2))
  return times_with_zero_limit(x, s), s + xc * ds * (_A + 3 * _B * x2)


gelu_tanh_kernel = with_derivative(
  lambda x: _gelu_tanh_parts(x)[0], lambda x: _gelu_tanh_parts(x)[1]
)


def gelu(x: ArrayLike, approximate: bool = False) -> Array:
  r"""Gaussian error linear unit; **exact (erf) form by default**.

  .. math::
    \mathrm{gelu}(x) = x\, \Phi(x) = \frac{x}{2}
      \mathrm{erfc}\!\left(-\frac{x}{\sqrt 2}\right)

  **Unlike** ``jax.nn.gelu``, whose default is the tanh approximation, the
  default here is the exact form, matching ``torch.nn.GELU()``, Hugging Face
  ``"gelu"`` and the paper. Pass ``approximate=True`` (or use
  :func:`gelu_tanh`) for the tanh form. The erfc form keeps full relative
  accuracy in the negative tail; ``gelu(-inf) = 0`` with derivative 0,
  ``gelu'(inf) = 1``.

  Args:
    x: input array of any shape and floating dtype.
    approximate: if True, compute :func:`gelu_tanh` instead.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.gelu(jnp.array([-jnp.inf, 0.0, 1.0]))
    Array([0.      , 0.      , 0.841345], dtype=float32)

  References:
    Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016.
    https://arxiv.org/abs/1606.08415

  See also:
    :func:`gelu_tanh`, :func:`quick_gelu`, :func:`geglu`.
  """
  if approximate:
    return gelu_tanh(x)
  return apply_elementwise(gelu_kernel, x)


def gelu_tanh(x: ArrayLike) -> Array:
  r"""The tanh approximation of GELU (``jax.nn.gelu``'s default).

  .. math::
    \mathrm{gelu\_tanh}(x) = \frac{x}{2}\left(1 + \tanh\!\left(
      \sqrt{2/\pi}\,(x + 0.044715 x^3)\right)\right) = x\, \sigma(2u)

  Computed as :math:`x\,\sigma(2u)` with :math:`u` the tanh argument, which is
  the same function without the cancellation of :math:`1 + \tanh(u)`: in
  float32, ``gelu_tanh(-5.)`` is ``-2.3e-7`` where ``jax.nn.gelu(-5.)`` returns
  ``-0.0``. Hugging Face names: ``"gelu_new"``, ``"gelu_pytorch_tanh"``,
  ``"gelu_fast"``; PyTorch ``GELU(approximate='tanh')``.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.gelu_tanh(jnp.array([0.0, 1.0]))
    Array([0.      , 0.841192], dtype=float32)
    >>> bool(flaxact.gelu_tanh(jnp.float32(-5.0)) < 0)  # jax.nn.gelu: -0.0
    True

  References:
    Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016.
    https://arxiv.org/abs/1606.08415
  """
  return apply_elementwise(gelu_tanh_kernel, x)


# --- gelu_10 -----------------------------------------------------------------
# GELU never goes below -0.17, so only the upper clip acts, and x * Phi(x) <= x
# reaches 10 exactly at x = 10 (Phi(10) rounds to 1 in float32 and float64):
# gelu_10(x) = gelu(x) for x <= 10, else 10. At x = 10 the derivative is
# gelu'(10), as torch.clamp's (it passes the gradient where min <= y <= max).
def _gelu_10_value(x: Array) -> Array:
  y = times_with_zero_limit(x, normal_cdf_pdf(x)[0])
  return jnp.where(x > GELU_CLIP, jnp.full_like(x, GELU_CLIP), y)


def _gelu_10_derivative(x: Array) -> Array:
  cdf, pdf = normal_cdf_pdf(x)
  dy = cdf + jnp.clip(x, -_CLIP, _CLIP) * pdf
  return jnp.where(x > GELU_CLIP, jnp.zeros_like(x), dy)


_gelu_10 = with_derivative(_gelu_10_value, _gelu_10_derivative)


def gelu_10(x: ArrayLike) -> Array:
  r"""Exact GELU clipped to ``[-10, 10]`` (Hugging Face ``"gelu_10"``).

  .. math::
    \mathrm{gelu\_10}(x) = \min(\max(x\,\Phi(x), -10), 10)

  Hugging Face's ``ClippedGELUActivation(min=-10, max=10)``, used to keep
  activations in a fixed range for quantisation. GELU is never below
  ``-0.17``, so only the upper clip acts: the result is :func:`gelu` up to
  ``x = 10`` and 10 beyond, with derivative ``gelu'(10)`` at ``x = 10`` (as
  ``torch.clamp``) and 0 above.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, in ``[-0.17, 10]``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.gelu_10(jnp.array([-jnp.inf, 1.0, 12.0]))
    Array([ 0.      ,  0.841345, 10.      ], dtype=float32)

  References:
    Shen et al., "Q-BERT: Hessian Based Ultra Low Precision Quantization of
    BERT", AAAI 2020. https://arxiv.org/abs/1909.05840

  See also:
    :func:`gelu`.
  """
  return apply_elementwise(_gelu_10, x)
