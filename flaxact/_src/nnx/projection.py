"""The NNX projection: the Linear-like sub-layer of every flaxact layer.

``gate_proj``, ``up_proj``, the fused ``gate_up_proj``, ``down_proj``, the
router: :class:`Projection`, built from a
:class:`~flaxact._src.layers.projection.ProjectionOptions`; the default
initialisers and :func:`make_param` (a parameter with logical axis names).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Dtype

from flaxact._src.layers import projection
from flaxact._src.layers.projection import ProjectionOptions

Array = jax.Array

#: Default kernel initialiser, as ``nnx.Linear``: LeCun normal (variance
#: scaling 1/fan_in, truncated normal).
default_kernel_init = nnx.initializers.lecun_normal()
#: Default bias initialiser: zeros.
default_bias_init = nnx.initializers.zeros_init()


def make_param(init, key, shape, dtype, axes) -> nnx.Param:
  """An ``nnx.Param`` from ``init`` with logical axis names ``axes``."""
  # Shard eagerly only under a mesh (jax.set_mesh), so the layers also work,
  # unsharded, where no mesh is set.
  eager = nnx.using_eager_sharding() and not (
    jax.sharding.get_abstract_mesh().empty
  )
  return nnx.Param(
    init(key, shape, dtype), out_sharding=axes, eager_sharding=eager
  )


class Projection(nnx.Module):
  """A Linear-like projection over the last axis with logical axis names.

  Holds ``kernel`` of shape ``(in_features, *features)`` and ``bias`` of
  shape ``features`` (or ``None``). Inputs and parameters go through
  ``flax.nnx.nn.dtypes.promote_dtype`` as in ``nnx.Linear`` (Qwix intercepts
  it to hand quantized weights through).

  Args:
    in_features: the input width.
    features: the output shape: ``(out,)`` or the fused ``(2, out)``.
    axes: logical axis names ``(kernel axes, bias axes)``.
    options: the projection options.
    rngs: the ``params`` stream initialises the kernel.
  """

  def __init__(
    self,
    in_features: int,
    features: tuple[int, ...],
    *,
    axes: tuple[tuple[Any, ...], tuple[Any, ...]],
    options: ProjectionOptions,
    rngs: nnx.Rngs,
  ):
    init = options.kernel_init
    if len(features) == 2:
      init = projection.fused_kernel_init(init)
    self.precision = options.precision
    self.dot_general = options.make_dot_general()
    self.kernel = make_param(
      init,
      rngs.params(),
      (in_features, *features),
      options.param_dtype,
      axes[0],
    )
    self.bias: nnx.Param | None
    if options.use_bias:
      self.bias = make_param(
        options.bias_init, rngs.params(), features, options.param_dtype, axes[1]
      )
    else:
      self.bias = nnx.data(None)

  def __call__(
    self,
    x: Array,
    *,
    dtype: Dtype | None = None,
    preferred_element_type: Dtype | None = None,
  ) -> Array:
    """Returns ``x @ kernel + bias``, shape ``(..., *features)``.

    Args:
      x: input, shape ``(..., in_features)``.
      dtype: the compute dtype; ``None`` uses the input's.
      preferred_element_type: the matmul output dtype, or ``None``.
    """
    dtype = projection.layer_dtype(x, dtype)
    kernel = self.kernel[...]
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = nnx_dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    return projection.project(
      x,
      kernel,
      bias,
      precision=self.precision,
      dot_general=self.dot_general,
      preferred_element_type=preferred_element_type,
    )
