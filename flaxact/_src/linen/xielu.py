"""The learnable xIELU activation for Flax Linen."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxact._src.activations import learnable
from flaxact._src.activations.xielu import (
  ALPHA_N_INIT,
  ALPHA_P_INIT,
  BETA,
  EPS,
  effective_parameters,
  raw_parameters,
  xielu,
)
from flaxact._src.common.checks import check_positive_int

Array = jax.Array


class XIELU(nn.Module):
  r"""xIELU with learnable :math:`\alpha_p` and :math:`\alpha_n` (Apertus).

  .. math::
    \mathrm{xielu}(x) = \begin{cases}
      \alpha_p x^2 + \beta x & x > 0 \\
      \alpha_n (e^{\min(x, \epsilon)} - 1 - x) + \beta x & x \le 0
    \end{cases}

  Hugging Face's ``XIELUActivation`` (``ACT2FN["xielu"]``): the parameters
  ``alpha_p`` and ``alpha_n`` are raw, with
  :math:`\alpha_p = \mathrm{softplus}(\mathtt{alpha\_p})` and
  :math:`\alpha_n = \beta + \mathrm{softplus}(\mathtt{alpha\_n})`, so a
  ``XIELUActivation`` state dict's ``alpha_p`` and ``alpha_n`` load as they
  are (reshaped from ``(1,)`` to ``()`` when shared); ``beta`` and ``eps``
  are fixed. Usable on its own and as the ``activation`` of ``FFN`` and
  ``GatedFFN``. See :func:`flaxact.xielu` for the function.

  Attributes:
    num_parameters: 1 for shared parameters (shape ``()``), or the size of
      the last axis for one pair per channel (shape ``(num_parameters,)``).
    alpha_p_init: the initial :math:`\alpha_p` (positive).
    alpha_n_init: the initial :math:`\alpha_n` (greater than ``beta``).
    beta: the linear slope :math:`\beta`.
    eps: the clamp :math:`\epsilon` of the exponential's argument.
    param_dtype: the dtype of the parameters.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> act = fl.XIELU()
    >>> x = jnp.array([-1.0, 1.0, 2.0])
    >>> variables = act.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'alpha_n': (), 'alpha_p': ()}}
    >>> act.apply(variables, x)
    Array([-0.20569646,  1.3       ,  4.2       ], dtype=float32)

  References:
    Huang & Schlag, "Deriving Activation Functions Using Integration", 2024.
    https://arxiv.org/abs/2411.13010
  """

  num_parameters: int = 1
  _: dataclasses.KW_ONLY
  alpha_p_init: float = ALPHA_P_INIT
  alpha_n_init: float = ALPHA_N_INIT
  beta: float = BETA
  eps: float = EPS
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive_int(self.num_parameters, 'num_parameters', 'XIELU')
    raw_parameters(self.alpha_p_init, self.alpha_n_init, self.beta)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies xIELU.

    Args:
      x: input of shape ``(..., num_parameters)`` (any shape when shared),
        floating dtype.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      ValueError: if the last axis does not match ``num_parameters``.
    """
    x = learnable.check_channel_input(x, self.num_parameters, 'XIELU')
    raw_p, raw_n = raw_parameters(
      self.alpha_p_init, self.alpha_n_init, self.beta
    )
    shape = learnable.param_shape(self.num_parameters)
    init = nn.initializers.constant
    a_p = self.param('alpha_p', init(raw_p), shape, self.param_dtype)
    a_n = self.param('alpha_n', init(raw_n), shape, self.param_dtype)
    alpha_p, alpha_n = effective_parameters(a_p, a_n, self.beta)
    return xielu(
      x,
      learnable.broadcast(alpha_p, x),
      learnable.broadcast(alpha_n, x),
      beta=self.beta,
      eps=self.eps,
    )
