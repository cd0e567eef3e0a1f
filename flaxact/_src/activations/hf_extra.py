r"""Hugging Face's less common ``ACT2FN`` activations.

``gelu_10`` (:func:`gelu_10`, ``ClippedGELUActivation(-10, 10)``),
``sqrtsoftplus`` (:func:`sqrt_softplus`, DeepSeek-V4's router score) and
``laplace`` (:func:`laplace`, MEGA's ``LaplaceActivation``), with Hugging
Face's semantics, accurate in both tails and with hand-written derivatives.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxact._src.activations.gelu import normal_cdf_pdf
from flaxact._src.activations.sigmoid import (
  sigmoid_parts,
  times_with_zero_limit,
)
from flaxact._src.common.checks import apply_elementwise
from flaxact._src.common.derivative import with_derivative

Array = jax.Array

#: ``gelu_10`` clips GELU to ``[-GELU_CLIP, GELU_CLIP]``.
GELU_CLIP = 10.0
#: Hugging Face's ``LaplaceActivation`` defaults.
LAPLACE_MU = 0.707107
LAPLACE_SIGMA = 0.282095
# Beyond |x| = 40 every Gaussian tail term is 0 in float32 and float64.
_GAUSS_CLIP = 40.0


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
  dy = cdf + jnp.clip(x, -_GAUSS_CLIP, _GAUSS_CLIP) * pdf
  return jnp.where(x > GELU_CLIP, jnp.zeros_like(x), dy)


_gelu_10 = with_derivative(_gelu_10_value, _gelu_10_derivative)


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


# --- laplace -----------------------------------------------------------------
# laplace(x) = Phi((x - mu) / sigma) = erfc(z) / 2, z = (mu - x) * _C. In
# float32 the rounding of z costs a relative error of about 2 z^2 ulp in the
# lower tail; its exact error is recovered (TwoSum for mu - x, Dekker's
# product for the scaling) and applied to first order, as gelu does.
_C = 1 / (LAPLACE_SIGMA * math.sqrt(2))
_X_CLIP = 15.5  # |x - mu| <= 15.5 keeps |z| <= 39: erfc is 0 or 2 beyond


def _split12(v: float) -> tuple[np.float32, np.float32, np.float32]:
  """``v`` as float32 ``hi`` (12 significant bits) + ``mid`` + rest ``lo``."""
  f = np.float32(v)
  bits = np.frombuffer(f.tobytes(), np.uint32) & np.uint32(0xFFFFF000)
  hi = np.frombuffer(bits.tobytes(), np.float32)[0]
  return hi, np.float32(f - hi), np.float32(v - float(f))


_MU32 = np.float32(LAPLACE_MU)
_MU_LO = np.float32(LAPLACE_MU - float(_MU32))
_C_HI, _C_MID, _C_LO = _split12(_C)
_C32 = np.float32(_C)


def _laplace_z(x: Array) -> tuple[Array, Array | None]:
  """``z = (mu - x) * _C`` and, in float32, its rounding error (or None)."""
  xc = jnp.clip(x, LAPLACE_MU - _X_CLIP, LAPLACE_MU + _X_CLIP)
  if xc.dtype != np.float32:
    return (LAPLACE_MU - xc) * _C, None
  d = _MU32 - xc
  bb = d - _MU32  # TwoSum: d + d_err == _MU32 - xc exactly
  d_err = (_MU32 - (d - bb)) + (-xc - bb)
  z = d * _C32
  s = d * np.float32(4097.0)  # Dekker: z + z_err == d * _C32 exactly
  d_hi = s - (s - d)
  d_lo = d - d_hi
  z_err = ((d_hi * _C_HI - z) + d_hi * _C_MID + d_lo * _C_HI) + d_lo * _C_MID
  delta = z_err + d * _C_LO + (d_err + _MU_LO) * _C32
  return z, delta


def _laplace_value(x: Array) -> Array:
  z, delta = _laplace_z(x)
  y = 0.5 * jax.lax.erfc(z)
  if delta is None:
    return y
  # erfc(z + delta) ~= erfc(z) (1 - 2 z delta) where the tail is thin.
  return jnp.where(z > 0, y * (1 - 2 * z * delta), y)


def _laplace_derivative(x: Array) -> Array:
  z, _ = _laplace_z(x)
  return (_C / math.sqrt(math.pi)) * jnp.exp(-(z * z))


_laplace = with_derivative(_laplace_value, _laplace_derivative)


def gelu_10(x: Any) -> Array:
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


def sqrt_softplus(x: Any) -> Array:
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


def laplace(x: Any) -> Array:
  r"""The Laplace activation of MEGA (Hugging Face ``"laplace"``).

  .. math::
    \mathrm{laplace}(x) = \frac12\left(1 + \mathrm{erf}\!\left(
      \frac{x - \mu}{\sigma\sqrt 2}\right)\right)
      = \Phi\!\left(\frac{x - \mu}{\sigma}\right),
    \quad \mu = 0.707107,\ \sigma = 0.282095

  A bounded, smooth stand-in for squared ReLU (it matches ``relu(x)**2`` in
  value and slope at :math:`x = \sqrt{1/2}`). Computed as
  :math:`\mathrm{erfc}(z)/2`, which keeps full relative accuracy in the lower
  tail: Hugging Face's ``1 + erf`` rounds to 0 in float32 below about
  ``x = -0.86``, where this returns the tiny positive value (the two agree to
  float32 rounding elsewhere).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``, in ``[0, 1]``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.laplace(jnp.array([-jnp.inf, 0.707107, jnp.inf]))
    Array([0. , 0.5, 1. ], dtype=float32)

  References:
    Ma et al., "Mega: Moving Average Equipped Gated Attention", ICLR 2023.
    https://arxiv.org/abs/2209.10655

  See also:
    :func:`relu_squared`, :func:`gelu`.
  """
  return apply_elementwise(_laplace, x)
