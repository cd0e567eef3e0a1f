"""Learnable activations for Flax NNX: ``PReLU`` and ``Swish``.

Each holds one ``nnx.Param``, shared (shape ``()``) or one per channel (shape
``(num_parameters,)``, applied along the last axis), and is usable on its own
or as the ``activation`` of :class:`FFN` and :class:`GatedFFN`, where it
becomes the layer's ``activation`` attribute with its parameter.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from flaxact import nnx as fx
  >>> act = fx.PReLU(num_parameters=3)
  >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(act)))
  {'negative_slope': (3,)}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxact._src.activations import learnable
from flaxact._src.activations.piecewise import leaky_relu
from flaxact._src.activations.swish import swish
from flaxact._src.common.checks import check_positive_int

Array = jax.Array


class PReLU(nnx.Module):
  r"""Parametric ReLU with a learnable negative slope.

  .. math::
    \mathrm{prelu}(x) = \max(x, 0) + a \min(x, 0)

  The slope :math:`a` is initialised to 0.25 (He et al. 2015, PyTorch).

  Args:
    num_parameters: 1 for one shared slope (shape ``()``), or the size of
      the last axis for one slope per channel (shape ``(num_parameters,)``).
    negative_slope_init: the initial slope.
    param_dtype: the dtype of the slope.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flaxact import nnx as fx
    >>> fx.PReLU()(jnp.array([-2.0, 0.0, 2.0]))
    Array([-0.5,  0. ,  2. ], dtype=float32)

  References:
    He et al., "Delving Deep into Rectifiers", ICCV 2015.
    https://arxiv.org/abs/1502.01852
  """

  def __init__(
    self,
    num_parameters: int = 1,
    *,
    negative_slope_init: float = 0.25,
    param_dtype: Any = jnp.float32,
  ):
    self.num_parameters = check_positive_int(
      num_parameters, 'num_parameters', 'PReLU'
    )
    self.negative_slope = nnx.Param(
      jnp.full(
        learnable.param_shape(self.num_parameters),
        negative_slope_init,
        param_dtype,
      )
    )

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
    return leaky_relu(x, learnable.broadcast(self.negative_slope[...], x))


class Swish(nnx.Module):
  r"""Swish with a learnable slope :math:`\beta`.

  .. math::
    \mathrm{swish}(x) = x \, \sigma(\beta x)

  :math:`\beta` is initialised to 1.0, where Swish is SiLU.

  Args:
    num_parameters: 1 for one shared ``beta`` (shape ``()``), or the size of
      the last axis for one per channel (shape ``(num_parameters,)``).
    beta_init: the initial ``beta``.
    param_dtype: the dtype of ``beta``.

  Examples:
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.GatedFFN(4, 8, activation=fx.Swish(8), rngs=nnx.Rngs(0))
    >>> layer.activation.beta.shape
    (8,)

  References:
    Ramachandran, Zoph & Le, "Searching for Activation Functions", 2017.
    https://arxiv.org/abs/1710.05941
  """

  def __init__(
    self,
    num_parameters: int = 1,
    *,
    beta_init: float = 1.0,
    param_dtype: Any = jnp.float32,
  ):
    self.num_parameters = check_positive_int(
      num_parameters, 'num_parameters', 'Swish'
    )
    self.beta = nnx.Param(
      jnp.full(
        learnable.param_shape(self.num_parameters), beta_init, param_dtype
      )
    )

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
    return swish(x, learnable.broadcast(self.beta[...], x))
