"""Flax Linen FFN layers: FFN, GatedFFN, SwiGLU, GeGLU and ReGLU.

A gated layer computes ``down_proj(act(gate_proj(x)) * up_proj(x))`` (LLaMA,
T5.1.1, Gemma); :class:`FFN` computes ``down_proj(act(up_proj(x)))``. Kernels
are stored ``(in_features, out_features)`` and annotated with the logical axis
names of :mod:`flaxact._src.sharding` (``nn.with_logical_partitioning``), so
parameters come back boxed; ``nn.unbox`` returns plain arrays.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact import linen as fl
  >>> layer = fl.SwiGLU(hidden_features=64)
  >>> x = jnp.ones((2, 16))
  >>> variables = layer.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, nn.unbox(variables))
  {'params': {'down_proj': {'kernel': (64, 16)},
              'gate_proj': {'kernel': (16, 64)},
              'up_proj': {'kernel': (16, 64)}}}
  >>> layer.apply(variables, x).shape
  (2, 16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxact._src import ffn_common, sharding

Array = jax.Array
Initializer = Callable[..., Array]

#: Default kernel initialiser, as ``flax.linen.Dense``: LeCun normal
#: (variance scaling 1/fan_in, truncated normal).
default_kernel_init = nn.initializers.lecun_normal()
#: Default bias initialiser: zeros.
default_bias_init = nn.initializers.zeros_init()


class Projection(nn.Module):
  """A Dense-like projection over the last axis with logical axis names.

  Holds ``kernel`` of shape ``(in_features, *features)`` and, with
  ``use_bias``, ``bias`` of shape ``features``. Used for ``gate_proj``,
  ``up_proj``, the fused ``gate_up_proj`` and ``down_proj``.

  Attributes:
    features: the output shape: ``(out,)`` or the fused ``(2, out)``.
    kernel_axes: logical axis names of the kernel.
    bias_axes: logical axis names of the bias.
    use_bias: whether to add a bias.
    dtype: the compute dtype.
    param_dtype: the dtype of the parameters.
    precision: matmul precision.
    kernel_init: kernel initialiser (for a fused kernel it is applied per
      half, with the unfused shape).
    bias_init: bias initialiser.
    dot_general: a :func:`jax.lax.dot_general` replacement or ``None``.
    preferred_element_type: the matmul output dtype or ``None``.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[Any, ...]
  bias_axes: tuple[Any, ...]
  use_bias: bool
  dtype: Any
  param_dtype: Any
  precision: Any
  kernel_init: Initializer
  bias_init: Initializer
  dot_general: Callable[..., Array] | None
  preferred_element_type: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Returns ``x @ kernel + bias``, shape ``(..., *features)``."""
    init = self.kernel_init
    if len(self.features) == 2:
      init = ffn_common.fused_kernel_init(init)
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(init, self.kernel_axes),
      (x.shape[-1], *self.features),
      self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
        'bias',
        nn.with_logical_partitioning(self.bias_init, self.bias_axes),
        self.features,
        self.param_dtype,
      )
    return ffn_common.project(
      x,
      cast(Array, kernel),
      cast('Array | None', bias),
      dtype=self.dtype,
      precision=self.precision,
      dot_general=self.dot_general,
      preferred_element_type=self.preferred_element_type,
    )


def _validate(module: Any) -> None:
  name = type(module).__name__
  ffn_common.check_features('hidden_features', module.hidden_features, name)
  if module.out_features is not None:
    ffn_common.check_features('out_features', module.out_features, name)
  ffn_common.check_dropout(
    module.dropout_rate, module.dropout_broadcast_dims, name
  )
  ffn_common.resolve_activation(module.activation, name)


def _dropout_key(module: Any, deterministic: bool | None) -> Array | None:
  name = type(module).__name__
  rate = module.dropout_rate
  if rate == 0.0:
    return None
  if deterministic is None:
    deterministic = module.deterministic
  if deterministic is None:
    raise ValueError(
      f'{name}(dropout_rate={rate}) needs deterministic=True (inference) or'
      ' deterministic=False (training), in the constructor or the call; got'
      ' neither.'
    )
  if deterministic:
    return None
  if not module.has_rng('dropout'):
    raise ValueError(
      f'{name}: dropout in training mode (deterministic=False, dropout_rate='
      f"{rate}) needs a 'dropout' rng, e.g. layer.apply(variables, x,"
      " deterministic=False, rngs={'dropout': key}); got none."
    )
  return module.make_rng('dropout')


def _projection(
  module: Any,
  name: str,
  features: tuple[int, ...],
  axes: tuple[tuple[Any, ...], tuple[Any, ...]],
  dtype: Any,
  preferred_element_type: Any = None,
) -> Projection:
  return Projection(
    features=features,
    kernel_axes=axes[0],
    bias_axes=axes[1],
    use_bias=module.use_bias,
    dtype=dtype,
    param_dtype=module.param_dtype,
    precision=module.precision,
    kernel_init=module.kernel_init,
    bias_init=module.bias_init,
    dot_general=module.dot_general,
    preferred_element_type=preferred_element_type,
    name=name,
  )


_IN_AXES = (sharding.IN_KERNEL_AXES, sharding.IN_BIAS_AXES)
_FUSED_AXES = (sharding.FUSED_KERNEL_AXES, sharding.FUSED_BIAS_AXES)
_OUT_AXES = (sharding.OUT_KERNEL_AXES, sharding.OUT_BIAS_AXES)

_OPTIONS_DOC = """
    activation: the element-wise activation: a registry name (see
      :func:`flaxact.get_activation`), a function, or a learnable activation
      module (:class:`PReLU`, :class:`Swish`), whose parameters then live in
      this layer under ``'activation'``.
    use_bias: add biases to the projections.
    dropout_rate: dropout rate on the hidden activation (before
      ``down_proj``).
    dropout_broadcast_dims: dimensions of the hidden activation over which
      one dropout mask is shared (as ``nn.Dropout``'s ``broadcast_dims``).
    deterministic: default of the call's ``deterministic`` (only needed when
      ``dropout_rate > 0``).
    dtype: the compute dtype; ``None`` (default) uses the input's dtype, so
      the output has the input's dtype.
    param_dtype: the dtype of the parameters (default float32).
    precision: matmul precision, passed to ``dot_general``.
    kernel_init: kernel initialiser; default LeCun normal, as
      ``nn.Dense``.
    bias_init: bias initialiser; default zeros.
    dot_general: replaces :func:`jax.lax.dot_general` in the three
      projections (the hook AQT and Qwix quantization use).
    activations_in_float32: for half-precision ``dtype``, the hidden-sized
      projections return float32 and the element-wise part (activation,
      product, dropout) runs in float32; the hidden activation is rounded
      to ``dtype`` once, for ``down_proj``. The saved pre-activations are
      then float32 (twice the memory). Without it the projections round to
      ``dtype`` and the activation runs in float32 internally and rounds
      once.
    remat: memory-lean backward: run the body under ``jax.checkpoint`` with
      a policy that saves only the pre-activations (``'ffn_gate'``,
      ``'ffn_up'``) and recomputes the element-wise part in the backward
      pass. No matmul is recomputed. ``False`` gives plain autodiff (the
      checkpoint names stay, for policies of the caller's own)."""


class GatedFFN(nn.Module):
  r"""A gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

  .. math::
    y = \left(\mathrm{act}(x W_g + b_g) \odot (x W_u + b_u)\right) W_d + b_d

  The layer of LLaMA, Mistral, Qwen, T5.1.1 and Gemma. Parameters:
  ``gate_proj``, ``up_proj`` (kernels ``(in, hidden)``) and ``down_proj``
  (``(hidden, out)``), or with ``fused_gate_up`` a single ``gate_up_proj``
  kernel ``(in, 2, hidden)`` that computes the same numbers in one matmul.
  **No biases by default** (LLaMA, Gemma, Mistral have none).

  The backward pass keeps two hidden-sized arrays (the gate and up
  pre-activations) with ``remat=True``; the hidden activation is recomputed.

  Attributes:
    hidden_features: the hidden width (``'mlp'``); see
      :func:`flaxact.ffn_hidden_features`.
    out_features: the output width; ``None`` (default) uses the input's.
    fused_gate_up: one fused ``gate_up_proj`` projection instead of
      ``gate_proj`` and ``up_proj``.
  """

  hidden_features: int
  out_features: int | None = None
  _: dataclasses.KW_ONLY
  activation: str | Callable[..., Any] = 'silu'
  use_bias: bool = False
  dropout_rate: float = 0.0
  dropout_broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  dot_general: Callable[..., Array] | None = None
  activations_in_float32: bool = False
  fused_gate_up: bool = False
  remat: bool = True

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
    """Applies the layer.

    Args:
      x: input of shape ``(..., in_features)``, floating dtype.
      deterministic: ``False`` applies dropout (needs a ``'dropout'`` rng);
        only needed when ``dropout_rate > 0``.

    Returns:
      An array of shape ``(..., out_features)`` in ``dtype`` (by default the
      input's dtype).

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: for dropout in training mode without a ``'dropout'`` rng.
    """
    x = ffn_common.check_input(x, type(self).__name__)
    key = _dropout_key(self, deterministic)
    forward = GatedFFN._forward
    if self.remat:
      forward = nn.checkpoint(forward, policy=ffn_common.GATED_REMAT_POLICY)
    return forward(self, x, key)

  @nn.compact
  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype = ffn_common.compute_dtype(x, self.dtype)
    pet = ffn_common.elementwise_dtype(dtype, self.activations_in_float32)
    hidden = self.hidden_features
    if self.fused_gate_up:
      gate_up_proj = _projection(
        self, 'gate_up_proj', (2, hidden), _FUSED_AXES, dtype, pet
      )

      def gate_up(x):
        return ffn_common.split_fused(gate_up_proj(x))
    else:
      gate_proj = _projection(
        self, 'gate_proj', (hidden,), _IN_AXES, dtype, pet
      )
      up_proj = _projection(self, 'up_proj', (hidden,), _IN_AXES, dtype, pet)

      def gate_up(x):
        return gate_proj(x), up_proj(x)

    out = self.out_features or x.shape[-1]
    down_proj = _projection(self, 'down_proj', (out,), _OUT_AXES, dtype)
    return ffn_common.gated_body(
      x,
      gate_up=gate_up,
      down=down_proj,
      activation=ffn_common.resolve_activation(
        self.activation, type(self).__name__
      ),
      parametric=isinstance(self.activation, nn.Module),
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )


GatedFFN.__doc__ = (
  (GatedFFN.__doc__ or '').rstrip()
  + _OPTIONS_DOC
  + """

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.GatedFFN(64, activation='gelu_tanh')  # Gemma's FFN
    >>> x = jnp.ones((2, 5, 16), jnp.bfloat16)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).dtype
    dtype(bfloat16)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202

  See also:
    :class:`SwiGLU`, :class:`GeGLU`, :class:`ReGLU`, :class:`FFN`.
"""
)


def _fixed_activation(layer: str, fixed: str):
  def __post_init__(self):
    if self.activation != fixed:
      raise ValueError(
        f'{layer} fixes activation={fixed!r}; got {self.activation!r}. Use'
        ' GatedFFN(activation=...) for another activation.'
      )
    GatedFFN.__post_init__(self)

  return __post_init__


class SwiGLU(GatedFFN):
  """The SwiGLU FFN of LLaMA, Mistral and PaLM: :class:`GatedFFN` with silu.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.
    **options: every keyword option of :class:`GatedFFN` except
      ``activation``, with the same defaults (no biases, ``remat=True``).

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

  _: dataclasses.KW_ONLY
  activation: str | Callable[..., Any] = 'silu'

  __post_init__ = _fixed_activation('SwiGLU', 'silu')


class GeGLU(GatedFFN):
  """GeGLU FFN: :class:`GatedFFN` with the **exact** (erf) GELU.

  For the tanh form of T5.1.1 and Gemma use
  ``GatedFFN(activation='gelu_tanh')``.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.
    **options: every keyword option of :class:`GatedFFN` except
      ``activation``, with the same defaults (no biases, ``remat=True``).

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
  activation: str | Callable[..., Any] = 'gelu'

  __post_init__ = _fixed_activation('GeGLU', 'gelu')


class ReGLU(GatedFFN):
  """ReGLU FFN: :class:`GatedFFN` with ReLU.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.
    **options: every keyword option of :class:`GatedFFN` except
      ``activation``, with the same defaults (no biases, ``remat=True``).

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
  activation: str | Callable[..., Any] = 'relu'

  __post_init__ = _fixed_activation('ReGLU', 'relu')


class FFN(nn.Module):
  r"""A plain feed-forward block: ``down_proj(act(up_proj(x)))``.

  .. math::
    y = \mathrm{act}(x W_u + b_u) W_d + b_d

  The layer of GPT-2, BERT, ViT and T5 v1.0. Parameters ``up_proj``
  (kernel ``(in, hidden)``) and ``down_proj`` (``(hidden, out)``). **Biases
  by default** (GPT-2, BERT, ViT have them; pass ``use_bias=False`` for T5)
  and the **exact** GELU by default. With ``remat=True`` the backward pass
  keeps one hidden-sized array, the pre-activation.

  Attributes:
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses the input's.
  """

  hidden_features: int
  out_features: int | None = None
  _: dataclasses.KW_ONLY
  activation: str | Callable[..., Any] = 'gelu'
  use_bias: bool = True
  dropout_rate: float = 0.0
  dropout_broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  dot_general: Callable[..., Array] | None = None
  activations_in_float32: bool = False
  remat: bool = True

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
    """Applies the layer.

    Args:
      x: input of shape ``(..., in_features)``, floating dtype.
      deterministic: ``False`` applies dropout (needs a ``'dropout'`` rng);
        only needed when ``dropout_rate > 0``.

    Returns:
      An array of shape ``(..., out_features)`` in ``dtype`` (by default the
      input's dtype).

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: for dropout in training mode without a ``'dropout'`` rng.
    """
    x = ffn_common.check_input(x, type(self).__name__)
    key = _dropout_key(self, deterministic)
    forward = FFN._forward
    if self.remat:
      forward = nn.checkpoint(forward, policy=ffn_common.FFN_REMAT_POLICY)
    return forward(self, x, key)

  @nn.compact
  def _forward(self, x: Array, key: Array | None) -> Array:
    dtype = ffn_common.compute_dtype(x, self.dtype)
    pet = ffn_common.elementwise_dtype(dtype, self.activations_in_float32)
    hidden = self.hidden_features
    up_proj = _projection(self, 'up_proj', (hidden,), _IN_AXES, dtype, pet)
    out = self.out_features or x.shape[-1]
    down_proj = _projection(self, 'down_proj', (out,), _OUT_AXES, dtype)
    return ffn_common.ffn_body(
      x,
      up=up_proj,
      down=down_proj,
      activation=ffn_common.resolve_activation(
        self.activation, type(self).__name__
      ),
      constrain=sharding.constrain_hidden,
      dropout_rate=self.dropout_rate,
      dropout_key=key,
      dropout_broadcast_dims=self.dropout_broadcast_dims,
    )


FFN.__doc__ = (
  (FFN.__doc__ or '').rstrip()
  + _OPTIONS_DOC
  + """

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flaxact import linen as fl
    >>> layer = fl.FFN(64, activation='gelu_new')  # GPT-2's MLP
    >>> x = jnp.ones((2, 16))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 16)
"""
)
