"""The NNX gated presets: SwiGLU, GeGLU and ReGLU.

Each is :class:`~flaxact._src.nnx.gated.GatedFFN` with a fixed activation
and the full signature of ``GatedFFN`` less ``activation``; passing
``activation=`` raises ``TypeError`` (as the Linen presets do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.layers.projection import DotGeneralCls
from flaxact._src.nnx.gated import GatedFFN
from flaxact._src.nnx.projection import default_bias_init, default_kernel_init


class GatedPreset(GatedFFN):
  """:class:`GatedFFN` with the activation fixed to ``fixed_activation``.

  The one signature of the presets: every argument of :class:`GatedFFN`
  but ``activation``, with the same defaults.
  """

  #: The activation every instance uses.
  fixed_activation: ClassVar[str]

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    *,
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
    super().__init__(
      in_features,
      hidden_features,
      out_features,
      activation=self.fixed_activation,
      use_bias=use_bias,
      dropout_rate=dropout_rate,
      dropout_broadcast_dims=dropout_broadcast_dims,
      deterministic=deterministic,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dot_general=dot_general,
      dot_general_cls=dot_general_cls,
      activations_in_float32=activations_in_float32,
      fused_gate_up=fused_gate_up,
      remat=remat,
      rngs=rngs,
    )


class SwiGLU(GatedPreset):
  """The SwiGLU FFN of LLaMA, Mistral and PaLM: :class:`GatedFFN` with silu.

  Takes every argument of :class:`GatedFFN` except ``activation``, which
  is fixed to ``'silu'``, with the same defaults (no biases,
  ``remat=True``); the options are those every flaxact NNX layer shares
  (the arguments of its base class, ``FFNBase``, listed with this layer's
  own in the API reference).

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.SwiGLU(32, 128, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 32))).shape
    (4, 32)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202
  """

  fixed_activation = 'silu'


class GeGLU(GatedPreset):
  """GeGLU FFN: :class:`GatedFFN` with the **exact** (erf) GELU.

  For the tanh form of T5.1.1 and Gemma use
  ``GatedFFN(..., activation='gelu_tanh')``.

  Takes every argument of :class:`GatedFFN` except ``activation``, which
  is fixed to ``'gelu'``, with the same defaults (no biases,
  ``remat=True``); the options are those every flaxact NNX layer shares
  (the arguments of its base class, ``FFNBase``, listed with this layer's
  own in the API reference).

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.GeGLU(32, 128, 8, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 32))).shape
    (4, 8)
  """

  fixed_activation = 'gelu'


class ReGLU(GatedPreset):
  """ReGLU FFN: :class:`GatedFFN` with ReLU.

  Takes every argument of :class:`GatedFFN` except ``activation``, which
  is fixed to ``'relu'``, with the same defaults (no biases,
  ``remat=True``); the options are those every flaxact NNX layer shares
  (the arguments of its base class, ``FFNBase``, listed with this layer's
  own in the API reference).

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.ReGLU(32, 128, use_bias=True, rngs=nnx.Rngs(0))
    >>> layer.gate_proj.bias.shape
    (128,)
  """

  fixed_activation = 'relu'
