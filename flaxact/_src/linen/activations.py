"""Learnable activations for Flax Linen: ``PReLU`` and ``Swish``.

Each holds one parameter, shared (shape ``()``) or one per channel (shape
``(num_parameters,)``, applied along the last axis), and is usable on its own
or as the ``activation`` of :class:`FFN` and :class:`GatedFFN`, where its
parameter lives inside the layer under ``'activation'``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flaxact import linen as fl
  >>> act = fl.PReLU(num_parameters=3)
  >>> variables = act.init(jax.random.key(0), jnp.ones((2, 3)))
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'negative_slope': (3,)}}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxact._src.activations import learnable
from flaxact._src.activations.piecewise import leaky_relu
from flaxact._src.activations.swish import swish
from flaxact._src.common.checks import check_positive_int

Array = jax.Array


class PReLU(nn.Module):
  r"""Parametric ReLU with a learnable negative slope.

  .. math::
    \mathrm{prelu}(x) = \max(x, 0) + a \min(x, 0)

  The slope :math:`a` is initialised to 0.25 (He et al. 2015, PyTorch).

  Attributes:
    num_parameters: 1 for one shared slope (shape ``()``), or the size of
      the last axis for one slope per channel (shape ``(num_parameters,)``).
    negative_slope_init: the initial slope.
    param_dtype: the dtype of the slope.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> act = fl.PReLU()
    >>> x = jnp.array([-2.0, 0.0, 2.0])
    >>> act.apply(act.init(jax.random.key(0), x), x)
    Array([-0.5,  0. ,  2. ], dtype=float32)

  References:
    He et al., "Delving Deep into Rectifiers", ICCV 2015.
    https://arxiv.org/abs/1502.01852
  """

  num_parameters: int = 1
  _: dataclasses.KW_ONLY
  negative_slope_init: float = 0.25
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive_int(self.num_parameters, 'num_parameters', 'PReLU')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies PReLU.

    Args:
      x: input of shape ``(..., num_parameters)`` (any shape when shared),
        floating dtype.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      ValueError: if the last axis does not match ``num_parameters``.
    """
    x = learnable.check_channel_input(x, self.num_parameters, 'PReLU')
    slope = self.param(
      'negative_slope',
      nn.initializers.constant(self.negative_slope_init),
      learnable.param_shape(self.num_parameters),
      self.param_dtype,
    )
    return leaky_relu(x, learnable.broadcast(slope, x))


class Swish(nn.Module):
  r"""Swish with a learnable slope :math:`\beta`.

  .. math::
    \mathrm{swish}(x) = x \, \sigma(\beta x)

  :math:`\beta` is initialised to 1.0, where Swish is SiLU.

  Attributes:
    num_parameters: 1 for one shared ``beta`` (shape ``()``), or the size of
      the last axis for one per channel (shape ``(num_parameters,)``).
    beta_init: the initial ``beta``.
    param_dtype: the dtype of ``beta``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.GatedFFN(8, activation=fl.Swish(num_parameters=8))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> jax.tree.map(jnp.shape, variables['params']['activation'])
    {'beta': (8,)}

  References:
    Ramachandran, Zoph & Le, "Searching for Activation Functions", 2017.
    https://arxiv.org/abs/1710.05941
  """

  num_parameters: int = 1
  _: dataclasses.KW_ONLY
  beta_init: float = 1.0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive_int(self.num_parameters, 'num_parameters', 'Swish')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies Swish.

    Args:
      x: input of shape ``(..., num_parameters)`` (any shape when shared),
        floating dtype.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      ValueError: if the last axis does not match ``num_parameters``.
    """
    x = learnable.check_channel_input(x, self.num_parameters, 'Swish')
    beta = self.param(
      'beta',
      nn.initializers.constant(self.beta_init),
      learnable.param_shape(self.num_parameters),
      self.param_dtype,
    )
    return swish(x, learnable.broadcast(beta, x))
