"""The Flax Linen plain FFN: ``down_proj(act(up_proj(x)))``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax

from flaxact._src.layers import ffn_body, projection, remat, sharding
from flaxact._src.layers.ffn_body import Activation
from flaxact._src.linen.base import FFNBase

Array = jax.Array


class FFN(FFNBase):
  r"""A plain feed-forward block: ``down_proj(act(up_proj(x)))``.

  .. math::
    y = \mathrm{act}(x W_u + b_u) W_d + b_d

  The layer of GPT-2, BERT, ViT and T5 v1.0. Parameters ``up_proj``
  (kernel ``(in, hidden)``) and ``down_proj`` (``(hidden, out)``). **Biases
  by default** (GPT-2, BERT, ViT have them; pass ``use_bias=False`` for T5)
  and the **exact** GELU by default. With ``remat=True`` the backward pass
  keeps one hidden-sized array, the pre-activation. The other options are
  shared by every flaxact Linen layer (the attributes of its base class,
  ``FFNBase``, listed with this layer's own in the API reference).

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.
    activation: the element-wise activation: a registry name, a function or
      a learnable activation module.
    use_bias: add biases to the projections (default ``True``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.FFN(64, activation='gelu_new')  # GPT-2's MLP
    >>> x = jnp.ones((2, 16))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 16)
  """

  hidden_features: int
  out_features: int | None = None
  _: dataclasses.KW_ONLY
  activation: Activation = 'gelu'
  use_bias: bool = True

  remat_names: ClassVar[tuple[str, ...]] = remat.FFN_NAMES

  def __post_init__(self):
    self.validate_options(
      self.activation,
      hidden_features=self.hidden_features,
      out_features=self.out_features,
    )
    super().__post_init__()

  @nn.compact
  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype = projection.layer_dtype(x, self.dtype)
    hidden_dtype = projection.hidden_projection_dtype(
      dtype, self.activations_in_float32
    )
    up_proj = self.projection(
      'up_proj',
      (self.hidden_features,),
      sharding.IN_PROJ_AXES,
      dtype,
      hidden_dtype,
    )
    out = self.out_features or x.shape[-1]
    down_proj = self.projection(
      'down_proj', (out,), sharding.OUT_PROJ_AXES, dtype
    )
    return ffn_body.ffn_body(
      x,
      up=up_proj,
      down=down_proj,
      activation=ffn_body.resolve_activation(
        self.activation, type(self).__name__
      ),
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )
