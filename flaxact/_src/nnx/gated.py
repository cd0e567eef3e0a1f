"""The NNX gated FFN: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.common import checks
from flaxact._src.layers import ffn_body, projection, remat, sharding
from flaxact._src.layers.projection import DotGeneralCls, ProjectionOptions
from flaxact._src.nnx.base import FFNBase
from flaxact._src.nnx.projection import (
  Projection,
  default_bias_init,
  default_kernel_init,
)

Array = jax.Array


class GatedFFN(FFNBase):
  r"""A gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

  .. math::
    y = \left(\mathrm{act}(x W_g + b_g) \odot (x W_u + b_u)\right) W_d + b_d

  The layer of LLaMA, Mistral, Qwen, T5.1.1 and Gemma. Attributes
  ``gate_proj``, ``up_proj`` (kernels ``(in, hidden)``) and ``down_proj``
  (``(hidden, out)``), or with ``fused_gate_up`` a single ``gate_up_proj``
  kernel ``(in, 2, hidden)`` that computes the same numbers in one matmul
  (``gate_proj`` and ``up_proj`` are then ``None``). **No biases by
  default** (LLaMA, Gemma, Mistral have none). The keyword options shared
  with :class:`FFN` are the arguments of the layers' base class,
  ``FFNBase`` (listed with this layer's own in the API reference).

  The backward pass keeps two hidden-sized arrays (the gate and up
  pre-activations) with ``remat=True``; the hidden activation is recomputed.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``); see
      :func:`flaxact.ffn_hidden_features`.
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
    fused_gate_up: one fused ``gate_up_proj`` projection instead of
      ``gate_proj`` and ``up_proj``: the same function given the same
      weights, though one fused matmul may round differently from two
      (equal within float tolerance, not bit for bit).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.GatedFFN(16, 64, activation='gelu_tanh',  # Gemma's FFN
    ...                     rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 5, 16), jnp.bfloat16)).dtype
    dtype(bfloat16)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202

  See also:
    :class:`SwiGLU`, :class:`GeGLU`, :class:`ReGLU`, :class:`FFN`.
  """

  remat_names: ClassVar[tuple[str, ...]] = remat.GATED_NAMES

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    *,
    activation: str | Callable[..., Any] = 'silu',
    use_bias: bool = False,
    dropout_rate: float = 0.0,
    dropout_broadcast_dims: Sequence[int] = (),
    deterministic: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: DotGeneralT | None = None,
    dot_general_cls: DotGeneralCls | None = None,
    activations_in_float32: bool = False,
    fused_gate_up: bool = False,
    remat: bool = True,
    rngs: nnx.Rngs,
  ):
    self.init_options(
      in_features=in_features,
      hidden_features=hidden_features,
      out_features=out_features,
      activation=activation,
      dropout_rate=dropout_rate,
      dropout_broadcast_dims=dropout_broadcast_dims,
      deterministic=deterministic,
      dtype=dtype,
      activations_in_float32=activations_in_float32,
      remat=remat,
      rngs=rngs,
    )
    options = ProjectionOptions(
      use_bias=use_bias,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dot_general=dot_general,
      dot_general_cls=dot_general_cls,
    )
    d, h = self.in_features, self.hidden_features

    def proj(in_features, features, axes):
      return Projection(
        in_features, features, axes=axes, options=options, rngs=rngs
      )

    self.gate_proj: Projection | None
    self.up_proj: Projection | None
    self.gate_up_proj: Projection | None
    if fused_gate_up:
      self.gate_proj = nnx.data(None)
      self.up_proj = nnx.data(None)
      self.gate_up_proj = proj(d, (2, h), sharding.FUSED_PROJ_AXES)
    else:
      self.gate_proj = proj(d, (h,), sharding.IN_PROJ_AXES)
      self.up_proj = proj(d, (h,), sharding.IN_PROJ_AXES)
      self.gate_up_proj = nnx.data(None)
    self.down_proj = proj(h, (self.out_features,), sharding.OUT_PROJ_AXES)

  def __call__(
    self,
    x: Array,
    *,
    deterministic: bool | None = None,
    rngs: Any = None,
  ) -> Array:
    """Applies the layer.

    Args:
      x: input of shape ``(..., in_features)``, floating dtype.
      deterministic: ``False`` applies dropout; ``None`` uses the
        attribute. Only matters when ``dropout_rate > 0``.
      rngs: an ``nnx.Rngs``, ``RngStream`` or key for the dropout mask,
        instead of the stream kept at construction.

    Returns:
      An array of shape ``(..., out_features)`` in ``dtype`` (by default the
      input's dtype).

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if the last axis of ``x`` is not ``in_features``, or for
        dropout in training mode without an rng.
    """
    x = checks.check_layer_input(x, type(self).__name__, self.in_features)
    key = self.dropout_key(deterministic, rngs)
    return self.run(GatedFFN._forward, x, key)

  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype, hidden_dtype = self.dtypes(x)
    if self.gate_up_proj is not None:
      gate_up_proj = self.gate_up_proj

      def gate_up(x):
        y = gate_up_proj(x, dtype=dtype, preferred_element_type=hidden_dtype)
        return projection.split_fused(y)
    else:
      gate_proj = cast(Projection, self.gate_proj)
      up_proj = cast(Projection, self.up_proj)

      def gate_up(x):
        return (
          gate_proj(x, dtype=dtype, preferred_element_type=hidden_dtype),
          up_proj(x, dtype=dtype, preferred_element_type=hidden_dtype),
        )

    return ffn_body.gated_body(
      x,
      gate_up=gate_up,
      down=lambda h: self.down_proj(h, dtype=dtype),
      activation=self.activation,
      parametric=isinstance(self.activation, nnx.Module),
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )
