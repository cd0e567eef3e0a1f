"""The stacked expert kernels of the Flax Linen ``MoE`` layer.

Each of ``gate_proj``, ``up_proj`` and ``down_proj`` is an
:class:`ExpertProjection`: one ``(E, in, features)`` kernel (and, with
``use_bias``, an ``(E, features)`` bias) with logical axis names.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact._src.layers.projection import ProjectionOptions
  >>> from flaxact._src.linen.experts import ExpertProjection
  >>> options = ProjectionOptions(
  ...     use_bias=True, param_dtype=jnp.float32, precision=None,
  ...     kernel_init=nn.initializers.lecun_normal(),
  ...     bias_init=nn.initializers.zeros_init())
  >>> proj = ExpertProjection(
  ...     num_experts=4, in_features=16, features=32,
  ...     axes=(('exp', 'embed', 'mlp'), ('exp', 'mlp')), options=options)
  >>> (kernel, bias), variables = proj.init_with_output(
  ...     jax.random.key(0), jnp.bfloat16, method='weights')
  >>> kernel.shape, kernel.dtype, bias.shape
  ((4, 16, 32), dtype(bfloat16), (4, 32))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax.linen import dtypes as linen_dtypes
from flax.typing import Dtype

from flaxact._src.common import interception
from flaxact._src.layers import moe_body
from flaxact._src.layers.projection import ProjectionOptions
from flaxact._src.moe.experts import dense

Array = jax.Array


class ExpertProjection(nn.Module):
  """Stacked expert kernels ``(E, in, features)`` and biases ``(E, features)``.

  :meth:`weights` returns ``(kernel, bias)`` passed through
  ``flax.linen.dtypes.promote_dtype`` (``bias`` is ``None`` without
  ``use_bias``) for the grouped matmul of :func:`flaxact.moe_ffn`. Calling
  the module returns every expert's projection of ``x`` (the ``'dense'``
  impl, :func:`flaxact._src.moe.experts.dense.project`): one
  ``dot_general`` (or the hook; ``dot_general_cls`` makes one instance
  here, as ``nn.Dense``) with this module's kernel, run inside this module
  so that Qwix finds and quantizes it.

  Attributes:
    num_experts: ``E``.
    in_features: the kernels' input width.
    features: the kernels' output width.
    axes: logical axis names ``(kernel axes, bias axes)``.
    options: the projection options (``kernel_init`` initialises one
      expert's ``(in, features)`` kernel).
  """

  num_experts: int
  in_features: int
  features: int
  axes: tuple[tuple[Any, ...], tuple[Any, ...]]
  options: ProjectionOptions

  def setup(self):
    o, e = self.options, self.num_experts
    self.kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(
        moe_body.stacked_init(o.kernel_init), self.axes[0]
      ),
      (e, self.in_features, self.features),
      o.param_dtype,
    )
    self.bias = None
    if o.use_bias:
      self.bias = self.param(
        'bias',
        nn.with_logical_partitioning(o.bias_init, self.axes[1]),
        (e, self.features),
        o.param_dtype,
      )

  def weights(self, dtype: Dtype) -> tuple[Any, Any]:
    """``(kernel, bias)`` promoted to the compute dtype ``dtype``."""
    kernel, bias = linen_dtypes.promote_dtype(
      self.kernel, self.bias, dtype=dtype
    )
    return kernel, bias

  def quantization_rule(self) -> Any:
    """The Qwix rule matching this module now (``None`` outside Qwix).

    The ``MoE`` layer asks each projection, so that a Qwix QAT rule's
    ``module_path`` is matched as for the projection's own ``dot_general``.
    """
    return interception.current_qwix_rule('dot_general')

  @nn.compact  # a dot_general_cls instance may be a Linen module
  def __call__(
    self, x: Array, *, dtype: Dtype, bias_scale: Array | None = None
  ) -> Array:
    """Every expert's projection of its rows.

    Args:
      x: ``(rows, E, in)``: each expert's input rows.
      dtype: the compute dtype.
      bias_scale: ``(E, rows)`` routing weights of the bias.

    Returns:
      ``(E, rows, features)``.
    """
    x, kernel, bias = linen_dtypes.promote_dtype(
      x, self.kernel, self.bias, dtype=dtype
    )
    return dense.project(
      x,
      kernel,
      bias,
      precision=self.options.precision,
      dot_general=self.options.make_dot_general(),
      bias_scale=bias_scale,
    )
