"""Exponential linear units: ELU, SELU and CELU.

The negative branch is evaluated on ``min(x, 0)`` so the unused branch can
never overflow. The derivative at 0 is the negative branch's, as in PyTorch:
``elu'(0) = alpha``, ``selu'(0) = scale * alpha``, ``celu'(0) = 1``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from flaxact._src.common.checks import apply_elementwise
from flaxact._src.common.derivative import copy_behind_barrier

Array = jax.Array

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _nonpositive(x: Array) -> Array:
  # Not jnp.minimum: its derivative at the tie x = 0 is 1/2.
  return jnp.where(x > 0, jnp.zeros_like(x), x)


def _elu_value(x: Array, alpha: Array) -> Array:
  return jnp.where(x > 0, x, alpha * jnp.expm1(_nonpositive(x)))


def _celu_value(x: Array, alpha: Array) -> Array:
  return jnp.where(x > 0, x, alpha * jnp.expm1(_nonpositive(x) / alpha))


def _elu_jvp(primals, tangents):
  x, alpha = primals
  t_x, t_alpha = tangents
  y = _elu_value(x, alpha)
  xb = copy_behind_barrier(x)
  v = _nonpositive(xb)
  dy = jnp.zeros_like(y)
  if not isinstance(t_x, SymbolicZero):
    dy = dy + jnp.where(xb > 0, 1.0, alpha * jnp.exp(v)) * t_x
  if not isinstance(t_alpha, SymbolicZero):
    dy = dy + jnp.expm1(v) * t_alpha
  return y, dy


def _celu_jvp(primals, tangents):
  x, alpha = primals
  t_x, t_alpha = tangents
  y = _celu_value(x, alpha)
  xb = copy_behind_barrier(x)
  u = _nonpositive(xb) / alpha
  dy = jnp.zeros_like(y)
  if not isinstance(t_x, SymbolicZero):
    dy = dy + jnp.where(xb > 0, 1.0, jnp.exp(u)) * t_x
  if not isinstance(t_alpha, SymbolicZero):
    dy = dy + (jnp.expm1(u) - u * jnp.exp(u)) * t_alpha
  return y, dy


# Custom derivatives in x and alpha: the value and the derivative each make one
# pass over x (see flaxact._src.common.derivative), and the derivative at 0 is
# the negative branch's, as in PyTorch.
_elu = jax.custom_jvp(_elu_value)
_elu.defjvp(_elu_jvp, symbolic_zeros=True)
_celu = jax.custom_jvp(_celu_value)
_celu.defjvp(_celu_jvp, symbolic_zeros=True)


def _as_array(alpha: Any, x: Array) -> Array:
  return jnp.asarray(alpha, x.dtype)


def elu(x: ArrayLike, alpha: ArrayLike = 1.0) -> Array:
  r"""Exponential linear unit.

  .. math::
    \mathrm{elu}(x) = \begin{cases} x & x > 0 \\
      \alpha (e^{x} - 1) & x \le 0 \end{cases}

  Args:
    x: input array of any shape and floating dtype.
    alpha: scale of the negative branch (scalar or broadcastable array).

  Returns:
    An array of the same shape and dtype as ``x``; ``elu(-inf) = -alpha``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.elu(jnp.array([-jnp.inf, 0.0, 2.0]))
    Array([-1.,  0.,  2.], dtype=float32)

  References:
    Clevert, Unterthiner & Hochreiter, "Fast and Accurate Deep Network
    Learning by Exponential Linear Units (ELUs)", ICLR 2016.
    https://arxiv.org/abs/1511.07289
  """
  return apply_elementwise(lambda v, a: _elu(v, _as_array(a, v)), x, alpha)


def selu(x: ArrayLike) -> Array:
  r"""Scaled exponential linear unit.

  .. math::
    \mathrm{selu}(x) = \lambda\, \mathrm{elu}(x, \alpha)

  with :math:`\alpha \approx 1.6733` and :math:`\lambda \approx 1.0507`, the
  self-normalising constants of the paper (the values PyTorch uses).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.selu(jnp.array([0.0, 1.0]))
    Array([0.      , 1.050701], dtype=float32)

  References:
    Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    https://arxiv.org/abs/1706.02515
  """
  return apply_elementwise(
    lambda v: SELU_SCALE * _elu(v, _as_array(SELU_ALPHA, v)),
    x,
  )


def celu(x: ArrayLike, alpha: ArrayLike = 1.0) -> Array:
  r"""Continuously differentiable exponential linear unit.

  .. math::
    \mathrm{celu}(x) = \begin{cases} x & x > 0 \\
      \alpha (e^{x / \alpha} - 1) & x \le 0 \end{cases}

  Args:
    x: input array of any shape and floating dtype.
    alpha: scale of the negative branch (scalar or broadcastable array).

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.celu(jnp.array([-jnp.inf, 2.0]), alpha=2.0)
    Array([-2.,  2.], dtype=float32)

  References:
    Barron, "Continuously Differentiable Exponential Linear Units", 2017.
    https://arxiv.org/abs/1704.07483
  """
  return apply_elementwise(lambda v, a: _celu(v, _as_array(a, v)), x, alpha)
