r"""xIELU, Apertus's learnable FFN activation, and its parameterisation.

:func:`xielu` takes the effective (positive) parameters
:math:`\alpha_p` and :math:`\alpha_n`. The learnable layers
(``flaxact.linen.XIELU``, ``flaxact.nnx.XIELU``) hold Hugging Face's raw
parameters ``alpha_p`` and ``alpha_n`` and map them with
:func:`effective_parameters` (:math:`\alpha_p = \mathrm{softplus}(a_p)`,
:math:`\alpha_n = \beta + \mathrm{softplus}(a_n)`), so that a
``XIELUActivation`` state dict loads unchanged; :func:`raw_parameters` is the
inverse, used to initialise them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flaxact._src.activations.sigmoid import softplus
from flaxact._src.common.checks import apply_elementwise

Array = jax.Array

#: Hugging Face ``XIELUActivation`` defaults.
ALPHA_P_INIT = 0.8
ALPHA_N_INIT = 0.8
BETA = 0.5
EPS = -1e-6


def _xielu(x: Array, alpha_p: Any, alpha_n: Any, beta: Any, eps: Any) -> Array:
  positive = x > 0
  # Each branch sees 0 where the other is taken, so that neither produces an
  # inf or NaN whose zero cotangent would still poison the gradient.
  xp = jnp.where(positive, x, jnp.zeros_like(x))
  xn = jnp.where(positive, jnp.zeros_like(x), x)
  pos = alpha_p * xp * xp + beta * xp
  # alpha_n (expm1(min(x, eps)) - x) + beta x, grouped so that x = -inf
  # gives the limit +inf (beta < alpha_n) rather than inf - inf.
  slope = beta - alpha_n
  linear = jnp.where(slope == 0, jnp.zeros_like(xn), slope * xn)
  neg = alpha_n * jnp.expm1(jnp.minimum(xn, eps)) + linear
  return jnp.where(positive, pos, neg)


def xielu(
  x: ArrayLike,
  alpha_p: ArrayLike = ALPHA_P_INIT,
  alpha_n: ArrayLike = ALPHA_N_INIT,
  *,
  beta: ArrayLike = BETA,
  eps: ArrayLike = EPS,
) -> Array:
  r"""xIELU, the expanded integral of the ELU.

  .. math::
    \mathrm{xielu}(x) = \begin{cases}
      \alpha_p x^2 + \beta x & x > 0 \\
      \alpha_n (e^{\min(x, \epsilon)} - 1 - x) + \beta x & x \le 0
    \end{cases}

  As Hugging Face's ``XIELUActivation`` computes it (its Python path), with
  the effective parameters :math:`\alpha_p > 0` and
  :math:`\alpha_n \ge \beta`; the defaults are its initial values. The
  :math:`\min(x, \epsilon)` clamp (``eps = -1e-6``) is kept, so the value
  steps by :math:`\alpha_n (e^\epsilon - 1) \approx -8 \cdot 10^{-7}` at 0
  and the derivative at 0 is :math:`\beta - \alpha_n`, as in PyTorch.
  ``xielu(-inf)`` is ``+inf`` (slope :math:`\beta - \alpha_n` there), not
  NaN. The parameters may be arrays that broadcast against ``x`` and are
  differentiable. Near the root on the negative side (about ``x = -2.3``
  with the defaults) the two terms cancel, so there the error is relative to
  their size, not to the small result.

  Args:
    x: input array of any shape and floating dtype.
    alpha_p: the positive-side curvature :math:`\alpha_p`.
    alpha_n: the negative-side scale :math:`\alpha_n`.
    beta: the linear slope :math:`\beta`.
    eps: the clamp :math:`\epsilon` of the exponential's argument.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.xielu(jnp.array([-1.0, 1.0, 2.0]))
    Array([-0.20569646,  1.3       ,  4.2       ], dtype=float32)

  References:
    Huang & Schlag, "Deriving Activation Functions Using Integration", 2024.
    https://arxiv.org/abs/2411.13010

  See also:
    ``flaxact.linen.XIELU``, ``flaxact.nnx.XIELU`` (learnable).
  """
  return apply_elementwise(_xielu, x, alpha_p, alpha_n, beta, eps)


def effective_parameters(
  raw_alpha_p: Array, raw_alpha_n: Array, beta: Any
) -> tuple[Array, Array]:
  r"""Maps raw parameters to :math:`(\alpha_p, \alpha_n)`.

  Args:
    raw_alpha_p: Hugging Face's ``alpha_p`` parameter.
    raw_alpha_n: Hugging Face's ``alpha_n`` parameter.
    beta: the linear slope.

  Returns:
    ``(softplus(raw_alpha_p), beta + softplus(raw_alpha_n))``.

  Examples:
    >>> import jax.numpy as jnp
    >>> ap, an = effective_parameters(jnp.float32(0.0), jnp.float32(0.0), 0.5)
    >>> round(float(ap), 4), round(float(an), 4)
    (0.6931, 1.1931)
  """
  return softplus(raw_alpha_p), beta + softplus(raw_alpha_n)


def _inverse_softplus(y: float) -> float:
  return y + math.log(-math.expm1(-y))  # log(expm1(y)), no overflow


def raw_parameters(
  alpha_p_init: float, alpha_n_init: float, beta: float, layer: str = 'XIELU'
) -> tuple[float, float]:
  r"""The raw parameters whose effective values are the given ones.

  Args:
    alpha_p_init: the initial :math:`\alpha_p`, positive.
    alpha_n_init: the initial :math:`\alpha_n`, greater than ``beta``.
    beta: the linear slope.
    layer: the layer's name, for error messages.

  Returns:
    ``(log(expm1(alpha_p_init)), log(expm1(alpha_n_init - beta)))``, as
    Hugging Face initialises them.

  Raises:
    ValueError: if ``alpha_p_init <= 0`` or ``alpha_n_init <= beta``.

  Examples:
    >>> [round(v, 4) for v in raw_parameters(0.8, 0.8, 0.5)]
    [0.2034, -1.0502]
  """
  if not alpha_p_init > 0:
    raise ValueError(
      f'{layer}: alpha_p_init must be positive (alpha_p = softplus(raw));'
      f' got {alpha_p_init!r}.'
    )
  if not alpha_n_init > beta:
    raise ValueError(
      f'{layer}: alpha_n_init must be greater than beta (alpha_n = beta +'
      f' softplus(raw)); got alpha_n_init={alpha_n_init!r}, beta={beta!r}.'
    )
  return (
    _inverse_softplus(float(alpha_p_init)),
    _inverse_softplus(float(alpha_n_init) - float(beta)),
  )
