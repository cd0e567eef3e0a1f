"""The stacked expert kernels of the Flax Linen ``MoE`` layer.

Each of ``gate_proj``, ``up_proj`` and ``down_proj`` is an
:class:`ExpertProjection`: one ``(E, in, features)`` kernel (and, with
``use_bias``, an ``(E, features)`` bias) with logical axis names.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact._src.linen_experts import ExpertProjection
  >>> proj = ExpertProjection(
  ...     num_experts=4, in_features=16, features=32,
  ...     axes=(('exp', 'embed', 'mlp'), ('exp', 'mlp')), use_bias=True,
  ...     param_dtype=jnp.float32, kernel_init=nn.initializers.lecun_normal(),
  ...     bias_init=nn.initializers.zeros_init())
  >>> (kernel, bias), variables = proj.init_with_output(
  ...     jax.random.key(0), jnp.bfloat16)
  >>> kernel.shape, kernel.dtype, bias.shape
  ((4, 16, 32), dtype(bfloat16), (4, 32))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax.linen import dtypes as linen_dtypes
from flax.typing import Dtype, Initializer

from flaxact._src import moe_layer

Array = jax.Array


class ExpertProjection(nn.Module):
  """Stacked expert kernels ``(E, in, features)`` and biases ``(E, features)``.

  Called with the compute dtype, returns ``(kernel, bias)`` passed through
  ``flax.linen.dtypes.promote_dtype`` (``bias`` is ``None`` without
  ``use_bias``); the grouped matmul itself runs in :func:`flaxact.moe_ffn`.

  Attributes:
    num_experts: ``E``.
    in_features: the kernels' input width.
    features: the kernels' output width.
    axes: logical axis names ``(kernel axes, bias axes)``.
    use_bias: whether to hold biases.
    param_dtype: the parameters' dtype.
    kernel_init: initialiser of one expert's ``(in, features)`` kernel.
    bias_init: bias initialiser.
  """

  num_experts: int
  in_features: int
  features: int
  axes: tuple[tuple[Any, ...], tuple[Any, ...]]
  use_bias: bool
  param_dtype: Dtype
  kernel_init: Initializer
  bias_init: Initializer

  @nn.compact
  def __call__(self, dtype: Dtype) -> tuple[Array, Array | None]:
    """Returns ``(kernel, bias)`` promoted to ``dtype``."""
    e = self.num_experts
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(
        moe_layer.stacked_init(self.kernel_init), self.axes[0]
      ),
      (e, self.in_features, self.features),
      self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
        'bias',
        nn.with_logical_partitioning(self.bias_init, self.axes[1]),
        (e, self.features),
        self.param_dtype,
      )
    kernel, bias = linen_dtypes.promote_dtype(kernel, bias, dtype=dtype)
    return kernel, bias
