"""Piecewise-linear and piecewise-polynomial activations.

At every kink the derivative is fixed and documented; it matches PyTorch's
autograd, so gradients agree when a model is ported: ``relu'(0) = 0``,
``leaky_relu'(0) = negative_slope``, ``relu6'(0) = relu6'(6) = 0``,
``hard_sigmoid'(±3) = 0``, ``hard_silu'(-3) = -1/2`` and
``hard_silu'(3) = 3/2``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flaxact._src.activations.sigmoid import times_with_zero_limit
from flaxact._src.common.checks import apply_elementwise, as_float_array

Array = jax.Array


@jax.custom_jvp
def relu_kernel(x: Array) -> Array:
  return jnp.maximum(x, 0)


@relu_kernel.defjvp
def _relu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return relu_kernel(x), jnp.where(x > 0, t, jnp.zeros_like(t))


@jax.custom_jvp
def _relu6(x: Array) -> Array:
  return jnp.minimum(jnp.maximum(x, 0), 6)


@_relu6.defjvp
def _relu6_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  inside = (x > 0) & (x < 6)
  return _relu6(x), jnp.where(inside, t, jnp.zeros_like(t))


@jax.custom_jvp
def _hard_silu(x: Array) -> Array:
  return times_with_zero_limit(x, _relu6(x + 3) * (1 / 6))


@_hard_silu.defjvp
def _hard_silu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  slope = jnp.where(x < -3, 0.0, jnp.where(x <= 3, x * (1 / 3) + 0.5, 1.0))
  return _hard_silu(x), slope.astype(t.dtype) * t


def _leaky_relu(x: Array, negative_slope: Any) -> Array:
  return jnp.where(x > 0, x, negative_slope * x)


def relu(x: ArrayLike) -> Array:
  r"""Rectified linear unit.

  .. math::
    \mathrm{relu}(x) = \max(x, 0)

  The derivative at the kink is :math:`\mathrm{relu}'(0) = 0`, as in
  ``jax.nn.relu`` and PyTorch. NaN in gives NaN out.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxact
    >>> flaxact.relu(jnp.array([-2.0, 0.0, 3.0]))
    Array([0., 0., 3.], dtype=float32)
    >>> float(jax.grad(flaxact.relu)(0.0))
    0.0

  References:
    Nair & Hinton, "Rectified Linear Units Improve Restricted Boltzmann
    Machines", ICML 2010.

  See also:
    :func:`leaky_relu`, :func:`relu6`, :func:`relu_squared`.
  """
  return apply_elementwise(relu_kernel, x)


def relu6(x: ArrayLike) -> Array:
  r"""ReLU clipped at 6.

  .. math::
    \mathrm{relu6}(x) = \min(\max(x, 0), 6)

  Derivatives at the kinks: :math:`\mathrm{relu6}'(0) = \mathrm{relu6}'(6) =
  0` (as ``jax.nn.relu6`` and PyTorch).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.relu6(jnp.array([-1.0, 3.0, 9.0]))
    Array([0., 3., 6.], dtype=float32)

  References:
    Krizhevsky, "Convolutional Deep Belief Networks on CIFAR-10", 2010.
  """
  return apply_elementwise(_relu6, x)


def leaky_relu(x: ArrayLike, negative_slope: ArrayLike = 0.01) -> Array:
  r"""Leaky rectified linear unit.

  .. math::
    \mathrm{leaky\relu_kernel}(x) = \begin{cases} x & x > 0 \\
      \alpha x & x \le 0 \end{cases}

  The derivative at 0 is ``negative_slope``, as in PyTorch (``jax.nn``
  returns 1 there). ``negative_slope`` may be an array (as in PReLU) and is
  differentiable.

  Args:
    x: input array of any shape and floating dtype.
    negative_slope: the slope :math:`\alpha` for non-positive inputs; a scalar
      or an array broadcastable to ``x``.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.leaky_relu(jnp.array([-2.0, 3.0]), negative_slope=0.5)
    Array([-1.,  3.], dtype=float32)

  References:
    Maas, Hannun & Ng, "Rectifier Nonlinearities Improve Neural Network
    Acoustic Models", ICML 2013.
  """
  return apply_elementwise(_leaky_relu, x, negative_slope)


def relu_squared(x: ArrayLike) -> Array:
  r"""Squared ReLU, as in Primer (Hugging Face name ``"relu2"``).

  .. math::
    \mathrm{relu\_squared}(x) = \max(x, 0)^2

  Its derivative :math:`2 \max(x, 0)` is continuous; the second derivative at
  0 is 0.

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.relu_squared(jnp.array([-2.0, 3.0]))
    Array([0., 9.], dtype=float32)

  References:
    So et al., "Primer: Searching for Efficient Transformers for Language
    Modeling", NeurIPS 2021. https://arxiv.org/abs/2109.08668
  """
  return apply_elementwise(lambda v: jnp.square(relu_kernel(v)), x)


def hard_sigmoid(x: ArrayLike) -> Array:
  r"""Piecewise-linear approximation of the sigmoid.

  .. math::
    \mathrm{hard\sigmoid_kernel}(x) = \mathrm{relu6}(x + 3) / 6

  Derivative 1/6 on (-3, 3) and 0 elsewhere, including at the breakpoints ±3
  (as PyTorch ``hardsigmoid`` and ``jax.nn.hard_sigmoid``).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.hard_sigmoid(jnp.array([-4.0, 0.0, 4.0]))
    Array([0. , 0.5, 1. ], dtype=float32)

  References:
    Howard et al., "Searching for MobileNetV3", ICCV 2019.
  """
  return apply_elementwise(lambda v: _relu6(v + 3) * (1 / 6), x)


def hard_silu(x: ArrayLike) -> Array:
  r"""Hard SiLU, also called hard swish.

  .. math::
    \mathrm{hard\silu_kernel}(x) = x \cdot \mathrm{relu6}(x + 3) / 6

  Derivative: 0 below -3, :math:`x/3 + 1/2` on [-3, 3], 1 above 3. At the
  breakpoints this gives ``hard_silu'(-3) = -0.5`` and ``hard_silu'(3) = 1.5``,
  PyTorch's ``hardswish`` values. **``jax.nn.hard_silu`` gives 0 and 1 there.**

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.hard_silu(jnp.array([-4.0, 0.0, 4.0]))
    Array([-0.,  0.,  4.], dtype=float32)

  References:
    Howard et al., "Searching for MobileNetV3", ICCV 2019.
  """
  return apply_elementwise(_hard_silu, x)


def identity(x: ArrayLike) -> Array:
  r"""The identity, :math:`f(x) = x` (Hugging Face name ``"linear"``).

  Args:
    x: input array of any shape and floating dtype.

  Returns:
    ``x`` as an array of the same shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.identity(jnp.array([-1.0, 2.0]))
    Array([-1.,  2.], dtype=float32)
  """
  return as_float_array(x)
