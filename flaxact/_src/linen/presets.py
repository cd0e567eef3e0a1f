"""The Flax Linen gated presets: SwiGLU, GeGLU and ReGLU."""

from __future__ import annotations

import dataclasses

from flaxact._src.layers.ffn_body import Activation
from flaxact._src.linen.gated import GatedFFN


def _check_fixed_activation(layer: GatedFFN, fixed: str) -> None:
  if layer.activation != fixed:
    raise TypeError(
      f'{type(layer).__name__} fixes activation={fixed!r}; got'
      f' activation={layer.activation!r}. Use GatedFFN(activation=...) for'
      ' another activation.'
    )


class SwiGLU(GatedFFN):
  """The SwiGLU FFN of LLaMA, Mistral and PaLM: :class:`GatedFFN` with silu.

  Takes every attribute of :class:`GatedFFN` with the same defaults (no
  biases, ``remat=True``); ``activation`` is fixed to ``'silu'``.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.

  Raises:
    TypeError: if given another ``activation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.SwiGLU(hidden_features=128)
    >>> x = jnp.ones((4, 32))
    >>> y, params = layer.init_with_output(jax.random.key(0), x)
    >>> y.shape
    (4, 32)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202
  """

  def __post_init__(self):
    _check_fixed_activation(self, 'silu')
    super().__post_init__()


class GeGLU(GatedFFN):
  """GeGLU FFN: :class:`GatedFFN` with the **exact** (erf) GELU.

  Takes every attribute of :class:`GatedFFN` with the same defaults;
  ``activation`` is fixed to ``'gelu'``. For the tanh form of T5.1.1 and
  Gemma use ``GatedFFN(activation='gelu_tanh')``.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.

  Raises:
    TypeError: if given another ``activation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.GeGLU(hidden_features=128, out_features=8)
    >>> x = jnp.ones((4, 32))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (4, 8)
  """

  _: dataclasses.KW_ONLY
  activation: Activation = 'gelu'

  def __post_init__(self):
    _check_fixed_activation(self, 'gelu')
    super().__post_init__()


class ReGLU(GatedFFN):
  """ReGLU FFN: :class:`GatedFFN` with ReLU.

  Takes every attribute of :class:`GatedFFN` with the same defaults;
  ``activation`` is fixed to ``'relu'``.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.

  Raises:
    TypeError: if given another ``activation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.ReGLU(hidden_features=128, use_bias=True)
    >>> x = jnp.ones((4, 32))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> sorted(variables['params']['gate_proj'])
    ['bias', 'kernel']
  """

  _: dataclasses.KW_ONLY
  activation: Activation = 'relu'

  def __post_init__(self):
    _check_fixed_activation(self, 'relu')
    super().__post_init__()
