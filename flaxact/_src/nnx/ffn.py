"""The Flax NNX plain FFN: ``down_proj(act(up_proj(x)))``.

A gated layer computes ``down_proj(act(gate_proj(x)) * up_proj(x))`` (LLaMA,
T5.1.1, Gemma); :class:`FFN` computes ``down_proj(act(up_proj(x)))``. The
projections are attributes ``gate_proj``, ``up_proj`` (or the fused
``gate_up_proj``) and ``down_proj``, each with ``kernel`` (stored
``(in_features, out_features)``) and ``bias`` (``None`` without biases),
``nnx.Param`` variables that carry the logical axis names of
:mod:`flaxact._src.layers.sharding` as ``out_sharding`` metadata.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from flaxact import nnx as fx
  >>> layer = fx.SwiGLU(16, 64, rngs=nnx.Rngs(0))
  >>> params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  >>> jax.tree.map(jnp.shape, params)
  {'down_proj': {'kernel': (64, 16)},
   'gate_proj': {'kernel': (16, 64)},
   'up_proj': {'kernel': (16, 64)}}
  >>> layer(jnp.ones((2, 16))).shape
  (2, 16)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.common import checks
from flaxact._src.layers import ffn_body, remat, sharding
from flaxact._src.layers.projection import DotGeneralCls, ProjectionOptions
from flaxact._src.nnx.base import FFNBase
from flaxact._src.nnx.projection import (
  Projection,
  default_bias_init,
  default_kernel_init,
)

Array = jax.Array


class FFN(FFNBase):
  r"""A plain feed-forward block: ``down_proj(act(up_proj(x)))``.

  .. math::
    y = \mathrm{act}(x W_u + b_u) W_d + b_d

  The layer of GPT-2, BERT, ViT and T5 v1.0. Attributes ``up_proj``
  (kernel ``(in, hidden)``) and ``down_proj`` (``(hidden, out)``). **Biases
  by default** (GPT-2, BERT, ViT have them; pass ``use_bias=False`` for T5)
  and the **exact** GELU by default. With ``remat=True`` the backward pass
  keeps one hidden-sized array, the pre-activation. The keyword options are
  the arguments of the layers' base class, ``FFNBase`` (listed with this
  layer's own in the API reference).

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.FFN(16, 64, activation='gelu_new',  # GPT-2's MLP
    ...                rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16))).shape
    (2, 16)
  """

  remat_names: ClassVar[tuple[str, ...]] = remat.FFN_NAMES

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    *,
    activation: str | Callable[..., Any] = 'gelu',
    use_bias: bool = True,
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
    self.up_proj = Projection(
      d, (h,), axes=sharding.IN_PROJ_AXES, options=options, rngs=rngs
    )
    self.down_proj = Projection(
      h,
      (self.out_features,),
      axes=sharding.OUT_PROJ_AXES,
      options=options,
      rngs=rngs,
    )

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
    return self.run(FFN._forward, x, key)

  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype, hidden_dtype = self.dtypes(x)
    return ffn_body.ffn_body(
      x,
      up=lambda x: self.up_proj(
        x, dtype=dtype, preferred_element_type=hidden_dtype
      ),
      down=lambda h: self.down_proj(h, dtype=dtype),
      activation=self.activation,
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )
