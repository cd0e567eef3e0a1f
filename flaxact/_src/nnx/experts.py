"""The sub-modules of the Flax NNX ``MoE`` layer: experts and shared expert.

:class:`ExpertProjection` holds one stacked expert kernel (``gate_proj``,
``up_proj`` or ``down_proj``); :func:`build_experts` and
:func:`build_shared` create the layer's sub-modules in the order that fixes
which ``rngs`` key each one draws.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from flaxact._src.layers.projection import ProjectionOptions
  >>> from flaxact._src.nnx import projection
  >>> from flaxact._src.nnx.experts import ExpertProjection
  >>> options = ProjectionOptions(
  ...     use_bias=False, param_dtype=jnp.float32, precision=None,
  ...     kernel_init=projection.default_kernel_init,
  ...     bias_init=projection.default_bias_init)
  >>> proj = ExpertProjection(
  ...     4, 16, 32, axes=(('exp', 'embed', 'mlp'), ('exp', 'mlp')),
  ...     options=options, rngs=nnx.Rngs(0))
  >>> kernel, bias = proj.weights(jnp.bfloat16)
  >>> kernel.shape, kernel.dtype, bias
  ((4, 16, 32), dtype(bfloat16), None)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Dtype

from flaxact._src.common import interception
from flaxact._src.layers import moe_body, sharding
from flaxact._src.layers.projection import ProjectionOptions
from flaxact._src.moe.experts import dense
from flaxact._src.nnx.gated import GatedFFN
from flaxact._src.nnx.projection import Projection, make_param

Array = jax.Array


class ExpertProjection(nnx.Module):
  """Stacked expert kernels ``(E, in, features)`` and biases ``(E, features)``.

  :meth:`weights` returns ``(kernel, bias)`` passed through
  ``flax.nnx.nn.dtypes.promote_dtype`` (``bias`` is ``None`` without
  ``use_bias``) for the grouped matmul of :func:`flaxact.moe_ffn`. Calling
  the module returns every expert's projection of ``x`` (the ``'dense'``
  impl, :func:`flaxact._src.moe.experts.dense.project`): one
  ``dot_general`` (or the ``dot_general`` hook) with this module's kernel,
  run inside this module so that Qwix finds and quantizes it.

  Args:
    num_experts: ``E``.
    in_features: the kernels' input width.
    features: the kernels' output width.
    axes: logical axis names ``(kernel axes, bias axes)``.
    options: the projection options (one ``dot_general_cls()`` instance).
    rngs: the ``params`` stream initialises the kernel.
  """

  def __init__(
    self,
    num_experts: int,
    in_features: int,
    features: int,
    *,
    axes: tuple[tuple[Any, ...], tuple[Any, ...]],
    options: ProjectionOptions,
    rngs: nnx.Rngs,
  ):
    init = moe_body.stacked_init(options.kernel_init)
    e, dt = num_experts, options.param_dtype
    self.precision = options.precision
    self.dot_general = options.make_dot_general()
    self.kernel = make_param(
      init, rngs.params(), (e, in_features, features), dt, axes[0]
    )
    self.bias: nnx.Param | None
    if options.use_bias:
      self.bias = make_param(
        options.bias_init, rngs.params(), (e, features), dt, axes[1]
      )
    else:
      self.bias = nnx.data(None)

  def weights(self, dtype: Dtype) -> tuple[Any, Any]:
    """``(kernel, bias)`` promoted to the compute dtype ``dtype``."""
    bias = None if self.bias is None else self.bias[...]
    kernel, bias = nnx_dtypes.promote_dtype(
      (self.kernel[...], bias), dtype=dtype
    )
    return kernel, bias

  def quantization_rule(self) -> Any:
    """The Qwix rule matching this module now (``None`` outside Qwix).

    The ``MoE`` layer asks each projection, so that a Qwix QAT rule's
    ``module_path`` is matched as for the projection's own ``dot_general``.
    """
    return interception.current_qwix_rule('dot_general')

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
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = nnx_dtypes.promote_dtype(
      (x, self.kernel[...], bias), dtype=dtype
    )
    return dense.project(
      x,
      kernel,
      bias,
      precision=self.precision,
      dot_general=self.dot_general,
      bias_scale=bias_scale,
    )


def build_experts(
  in_features: int,
  hidden_features: int,
  out_features: int,
  num_experts: int,
  *,
  options: ProjectionOptions,
  rngs: nnx.Rngs,
) -> tuple[ExpertProjection, ExpertProjection, ExpertProjection]:
  """``(gate_proj, up_proj, down_proj)``, created in that order.

  Args:
    in_features: ``d``, the input width.
    hidden_features: ``h``, each expert's hidden width.
    out_features: the output width.
    num_experts: ``E``.
    options: the projection options.
    rngs: the ``params`` stream initialises the kernels.

  Returns:
    Kernels ``(E, d, h)``, ``(E, d, h)`` and ``(E, h, out_features)``.
  """

  def experts(n_in, n_out, axes):
    return ExpertProjection(
      num_experts, n_in, n_out, axes=axes, options=options, rngs=rngs
    )

  d, h = in_features, hidden_features
  return (
    experts(d, h, sharding.EXPERT_IN_PROJ_AXES),
    experts(d, h, sharding.EXPERT_IN_PROJ_AXES),
    experts(h, out_features, sharding.EXPERT_OUT_PROJ_AXES),
  )


def build_shared(
  in_features: int,
  hidden_features: int,
  out_features: int,
  *,
  gate: bool,
  activation: str | Callable[..., Any],
  dtype: Dtype | None,
  options: ProjectionOptions,
  rngs: nnx.Rngs,
) -> tuple[GatedFFN, Projection | None]:
  """The always-on shared expert and, with ``gate``, its ``(d, 1)`` gate.

  Args:
    in_features: the input width.
    hidden_features: the shared expert's hidden width.
    out_features: the output width.
    gate: whether to create Qwen2-MoE's ``shared_expert_gate``.
    activation: the shared expert's activation.
    dtype: the compute dtype; ``None`` uses the input's.
    options: the projection options (the gate has no bias).
    rngs: the ``params`` stream initialises the weights.

  Returns:
    ``(shared_expert, shared_expert_gate)``; the gate is ``None`` without
    ``gate``.
  """
  shared = GatedFFN(
    in_features,
    hidden_features,
    out_features,
    activation=activation,
    dtype=dtype,
    param_dtype=options.param_dtype,
    precision=options.precision,
    kernel_init=options.kernel_init,
    bias_init=options.bias_init,
    dot_general=options.dot_general,
    dot_general_cls=options.dot_general_cls,
    remat=False,
    rngs=rngs,
  )
  shared_gate = None
  if gate:
    shared_gate = Projection(
      in_features,
      (1,),
      axes=sharding.ROUTER_PROJ_AXES,
      options=dataclasses.replace(options, use_bias=False),
      rngs=rngs,
    )
  return shared, shared_gate
