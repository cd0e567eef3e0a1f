r"""MEGA's Laplace activation (Hugging Face ``"laplace"``), accurate tails.

``laplace(x) = Phi((x - mu) / sigma)`` with Hugging Face's
``LaplaceActivation`` defaults, computed as ``erfc(z) / 2`` with the float32
rounding of ``z`` recovered (error-free sum and product) so that the lower
tail keeps full relative accuracy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flaxact._src.common.checks import apply_elementwise
from flaxact._src.common.derivative import with_derivative
from flaxact._src.common.float32 import product_error, split_constant

Array = jax.Array

#: Hugging Face's ``LaplaceActivation`` defaults.
LAPLACE_MU = 0.707107
LAPLACE_SIGMA = 0.282095


# --- laplace -----------------------------------------------------------------
# laplace(x) = Phi((x - mu) / sigma) = erfc(z) / 2, z = (mu - x) * _C. In
# float32 the rounding of z costs a relative error of about 2 z^2 ulp in the
# lower tail; its exact error is recovered (TwoSum for mu - x, Dekker's
# product for the scaling) and applied to first order, as gelu does.
_C = 1 / (LAPLACE_SIGMA * math.sqrt(2))
_X_CLIP = 15.5  # |x - mu| <= 15.5 keeps |z| <= 39: erfc is 0 or 2 beyond


_MU32 = np.float32(LAPLACE_MU)
_MU_LO = np.float32(LAPLACE_MU - float(_MU32))
_C_SPLIT = split_constant(_C)


def _laplace_z(x: Array) -> tuple[Array, Array | None]:
  """``z = (mu - x) * _C`` and, in float32, its rounding error (or None)."""
  xc = jnp.clip(x, LAPLACE_MU - _X_CLIP, LAPLACE_MU + _X_CLIP)
  if xc.dtype != np.float32:
    return (LAPLACE_MU - xc) * _C, None
  d = _MU32 - xc
  bb = d - _MU32  # TwoSum: d + d_err == _MU32 - xc exactly
  d_err = (_MU32 - (d - bb)) + (-xc - bb)
  z = d * _C_SPLIT.value
  z_err = product_error(d, _C_SPLIT)  # z + z_err == d * value exactly
  delta = z_err + d * _C_SPLIT.rest + (d_err + _MU_LO) * _C_SPLIT.value
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


def laplace(x: ArrayLike) -> Array:
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
