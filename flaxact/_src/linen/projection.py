"""The Linen projection: the Dense-like sub-layer of every flaxact layer.

``gate_proj``, ``up_proj``, the fused ``gate_up_proj``, ``down_proj``, the
router: :class:`Projection`, built from a
:class:`~flaxact._src.layers.projection.ProjectionOptions`, and the default
initialisers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax.linen import dtypes as linen_dtypes
from flax.typing import Dtype

from flaxact._src.layers import projection
from flaxact._src.layers.projection import ProjectionOptions

Array = jax.Array

#: Default kernel initialiser, as ``flax.linen.Dense``: LeCun normal
#: (variance scaling 1/fan_in, truncated normal).
default_kernel_init = nn.initializers.lecun_normal()
#: Default bias initialiser: zeros.
default_bias_init = nn.initializers.zeros_init()


class Projection(nn.Module):
  """A Dense-like projection over the last axis with logical axis names.

  Holds ``kernel`` of shape ``(in_features, *features)`` and, with
  ``use_bias``, ``bias`` of shape ``features``. Inputs and parameters go
  through ``flax.linen.dtypes.promote_dtype`` as in ``nn.Dense`` (Qwix
  intercepts it to hand quantized weights through).

  Attributes:
    features: the output shape: ``(out,)`` or the fused ``(2, out)``.
    kernel_axes: logical axis names of the kernel.
    bias_axes: logical axis names of the bias.
    options: the projection options; ``dot_general_cls`` makes one
      instance per projection (as ``nn.Dense``), so a Linen quantizer such
      as AQT's ``AqtDotGeneral`` keeps its own state per projection.
    dtype: the compute dtype.
    preferred_element_type: the matmul output dtype or ``None``.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[Any, ...]
  bias_axes: tuple[Any, ...]
  options: ProjectionOptions
  dtype: Dtype
  preferred_element_type: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Returns ``x @ kernel + bias``, shape ``(..., *features)``."""
    o = self.options
    init = o.kernel_init
    if len(self.features) == 2:
      init = projection.fused_kernel_init(init)
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(init, self.kernel_axes),
      (x.shape[-1], *self.features),
      o.param_dtype,
    )
    bias = None
    if o.use_bias:
      bias = self.param(
        'bias',
        nn.with_logical_partitioning(o.bias_init, self.bias_axes),
        self.features,
        o.param_dtype,
      )
    x, kernel, bias = linen_dtypes.promote_dtype(
      x, kernel, bias, dtype=self.dtype
    )
    return projection.project(
      x,
      kernel,
      bias,
      precision=o.precision,
      dot_general=o.make_dot_general(),
      preferred_element_type=self.preferred_element_type,
    )
