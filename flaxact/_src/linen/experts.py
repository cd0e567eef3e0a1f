"""The stacked expert kernels of the Flax Linen ``MoE`` layer.

Each of ``gate_proj``, ``up_proj`` and ``down_proj`` is an
:class:`ExpertProjection`: one ``(E, in, features)`` kernel (and, with
``use_bias``, an ``(E, features)`` bias) with logical axis names.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact._src.linen.experts import ExpertProjection
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
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.layers import moe_body
from flaxact._src.layers.projection import DotGeneralCls
from flaxact._src.moe.experts import dense

Array = jax.Array


class ExpertProjection(nn.Module):
  """Stacked expert kernels ``(E, in, features)`` and biases ``(E, features)``.

  Called with the compute dtype alone, returns ``(kernel, bias)`` passed
  through ``flax.linen.dtypes.promote_dtype`` (``bias`` is ``None`` without
  ``use_bias``) for the grouped matmul of :func:`flaxact.moe_ffn`. Called
  with ``x`` too, returns every expert's projection of ``x`` (the
  ``'dense'`` impl, :func:`flaxact._src.moe.experts.dense.project`): one
  ``dot_general`` (or the hook; ``dot_general_cls`` makes one instance
  here, as ``nn.Dense``) with this module's kernel, run inside this module
  so that Qwix finds and quantizes it.

  Attributes:
    num_experts: ``E``.
    in_features: the kernels' input width.
    features: the kernels' output width.
    axes: logical axis names ``(kernel axes, bias axes)``.
    use_bias: whether to hold biases.
    param_dtype: the parameters' dtype.
    kernel_init: initialiser of one expert's ``(in, features)`` kernel.
    bias_init: bias initialiser.
    precision: matmul precision.
    dot_general: a :func:`jax.lax.dot_general` replacement or ``None``.
    dot_general_cls: a class whose instance replaces ``dot_general``.
  """

  num_experts: int
  in_features: int
  features: int
  axes: tuple[tuple[Any, ...], tuple[Any, ...]]
  use_bias: bool
  param_dtype: Dtype
  kernel_init: Initializer
  bias_init: Initializer
  precision: PrecisionLike = None
  dot_general: DotGeneralT | None = None
  dot_general_cls: DotGeneralCls | None = None

  @nn.compact
  def __call__(
    self,
    dtype: Dtype,
    x: Array | None = None,
    *,
    bias_scale: Array | None = None,
  ) -> Any:
    """``(kernel, bias)`` promoted to ``dtype``, or the projection of ``x``.

    Args:
      dtype: the compute dtype.
      x: ``(rows, E, in)``: each expert's input rows.
      bias_scale: ``(E, rows)`` routing weights of the bias.
    """
    e = self.num_experts
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(
        moe_body.stacked_init(self.kernel_init), self.axes[0]
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
    if x is None:
      kernel, bias = linen_dtypes.promote_dtype(kernel, bias, dtype=dtype)
      return kernel, bias
    x, kernel, bias = linen_dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    assert x is not None  # promote_dtype keeps a given array
    dot_general = self.dot_general
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    return dense.project(
      x,
      kernel,
      bias,
      precision=self.precision,
      dot_general=dot_general,
      bias_scale=bias_scale,
    )
