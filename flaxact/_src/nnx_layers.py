"""Flax NNX FFN layers: FFN, GatedFFN, SwiGLU, GeGLU and ReGLU.

A gated layer computes ``down_proj(act(gate_proj(x)) * up_proj(x))`` (LLaMA,
T5.1.1, Gemma); :class:`FFN` computes ``down_proj(act(up_proj(x)))``. The
projections are attributes ``gate_proj``, ``up_proj`` (or the fused
``gate_up_proj``) and ``down_proj``, each with ``kernel`` (stored
``(in_features, out_features)``) and ``bias`` (``None`` without biases),
``nnx.Param`` variables that carry the logical axis names of
:mod:`flaxact._src.sharding` as ``out_sharding`` metadata.

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

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from flaxact._src import ffn_common, sharding

Array = jax.Array
Initializer = Callable[..., Array]

#: Default kernel initialiser, as ``nnx.Linear``: LeCun normal (variance
#: scaling 1/fan_in, truncated normal).
default_kernel_init = nnx.initializers.lecun_normal()
#: Default bias initialiser: zeros.
default_bias_init = nnx.initializers.zeros_init()


def _param(init, key, shape, dtype, axes) -> nnx.Param:
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
  shape ``features`` (or ``None``). Used for ``gate_proj``, ``up_proj``, the
  fused ``gate_up_proj`` and ``down_proj``.

  Args:
    in_features: the input width.
    features: the output shape: ``(out,)`` or the fused ``(2, out)``.
    kernel_axes: logical axis names of the kernel.
    bias_axes: logical axis names of the bias.
    use_bias: whether to add a bias.
    param_dtype: the dtype of the parameters.
    precision: matmul precision.
    kernel_init: kernel initialiser (for a fused kernel it is applied per
      half, with the unfused shape).
    bias_init: bias initialiser.
    dot_general: a :func:`jax.lax.dot_general` replacement or ``None``.
    rngs: the ``params`` stream initialises the kernel.
  """

  def __init__(
    self,
    in_features: int,
    features: tuple[int, ...],
    *,
    kernel_axes: tuple[Any, ...],
    bias_axes: tuple[Any, ...],
    use_bias: bool,
    param_dtype: Any,
    precision: Any,
    kernel_init: Initializer,
    bias_init: Initializer,
    dot_general: Callable[..., Array] | None,
    rngs: nnx.Rngs,
  ):
    init = kernel_init
    if len(features) == 2:
      init = ffn_common.fused_kernel_init(init)
    self.precision = precision
    self.dot_general = dot_general
    self.kernel = _param(
      init, rngs.params(), (in_features, *features), param_dtype, kernel_axes
    )
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = _param(
        bias_init, rngs.params(), features, param_dtype, bias_axes
      )
    else:
      self.bias = nnx.data(None)

  def __call__(
    self, x: Array, *, dtype: Any = None, preferred_element_type: Any = None
  ) -> Array:
    """Returns ``x @ kernel + bias`` in ``dtype`` (default: ``x``'s)."""
    return ffn_common.project(
      x,
      self.kernel[...],
      None if self.bias is None else self.bias[...],
      dtype=ffn_common.compute_dtype(x, dtype),
      precision=self.precision,
      dot_general=self.dot_general,
      preferred_element_type=preferred_element_type,
    )


class _Base(nnx.Module):
  """Options, dropout and remat shared by :class:`FFN` and :class:`GatedFFN`."""

  def _setup(self, in_features, hidden_features, out_features, options):
    name = type(self).__name__
    self.in_features = ffn_common.check_features(
      'in_features', in_features, name
    )
    self.hidden_features = ffn_common.check_features(
      'hidden_features', hidden_features, name
    )
    if out_features is None:
      out_features = in_features
    self.out_features = ffn_common.check_features(
      'out_features', out_features, name
    )
    activation = options['activation']
    fn = ffn_common.resolve_activation(activation, name)
    self.activation = activation if isinstance(activation, nnx.Module) else fn
    ffn_common.check_dropout(
      options['dropout_rate'], options['dropout_broadcast_dims'], name
    )
    self.dropout_rate = float(options['dropout_rate'])
    self.dropout_broadcast_dims = tuple(options['dropout_broadcast_dims'])
    self.deterministic = options['deterministic']
    self.dtype = options['dtype']
    self.activations_in_float32 = options['activations_in_float32']
    self.remat = options['remat']
    rngs = options['rngs']
    stream = None
    if self.dropout_rate > 0:
      try:
        stream = rngs['dropout'].fork()
      except KeyError:
        stream = None
    self.rngs = nnx.data(stream)

  def _proj(self, in_features, features, axes, options) -> Projection:
    return Projection(
      in_features,
      features,
      kernel_axes=axes[0],
      bias_axes=axes[1],
      use_bias=options['use_bias'],
      param_dtype=options['param_dtype'],
      precision=options['precision'],
      kernel_init=options['kernel_init'],
      bias_init=options['bias_init'],
      dot_general=options['dot_general'],
      rngs=options['rngs'],
    )

  def _dropout_key(self, deterministic, rngs) -> Array | None:
    name = type(self).__name__
    if self.dropout_rate == 0.0:
      return None
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic:
      return None
    given = rngs
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, nnx.Rngs):
      try:
        rngs = rngs['dropout']
      except KeyError:
        rngs = None
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    if isinstance(rngs, jax.Array):
      return rngs
    if given is None:
      got = 'no rngs at the call and no dropout stream kept from construction'
    elif isinstance(given, nnx.Rngs):
      got = f"an nnx.Rngs without a 'dropout' or 'default' stream: {given!r}"
    else:
      got = f'{type(given).__name__} {given!r}'
    raise ValueError(
      f'{name}: dropout in training mode (deterministic=False, dropout_rate='
      f'{self.dropout_rate}) needs an rng: construct the layer with'
      ' rngs=nnx.Rngs(params=..., dropout=...) or pass rngs= (an nnx.Rngs,'
      f' RngStream or key) to the call; got {got}. For inference use'
      ' deterministic=True or layer.eval().'
    )

  def _dtypes(self, x: Array) -> tuple[Any, Any]:
    dtype = ffn_common.compute_dtype(x, self.dtype)
    return dtype, ffn_common.elementwise_dtype(
      dtype, self.activations_in_float32
    )


_IN_AXES = (sharding.IN_KERNEL_AXES, sharding.IN_BIAS_AXES)
_FUSED_AXES = (sharding.FUSED_KERNEL_AXES, sharding.FUSED_BIAS_AXES)
_OUT_AXES = (sharding.OUT_KERNEL_AXES, sharding.OUT_BIAS_AXES)

_OPTIONS_DOC = """
    activation: the element-wise activation: a registry name (see
      :func:`flaxact.get_activation`), a function, or a learnable activation
      module (:class:`PReLU`, :class:`Swish`), which then becomes this
      layer's ``activation`` attribute with its parameters.
    use_bias: add biases to the projections.
    dropout_rate: dropout rate on the hidden activation (before
      ``down_proj``).
    dropout_broadcast_dims: dimensions of the hidden activation over which
      one dropout mask is shared (as ``nnx.Dropout``'s ``broadcast_dims``).
    deterministic: the default of the call's ``deterministic``; ``False``
      (as ``nnx.Dropout``) applies dropout. ``layer.eval()`` sets it to
      ``True``.
    dtype: the compute dtype; ``None`` (default) uses the input's dtype, so
      the output has the input's dtype.
    param_dtype: the dtype of the parameters (default float32).
    precision: matmul precision, passed to ``dot_general``.
    kernel_init: kernel initialiser; default LeCun normal, as
      ``nnx.Linear``.
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
    remat: memory-lean backward: run the body under ``jax.checkpoint``
      with a policy that saves only the pre-activations (``'ffn_gate'``,
      ``'ffn_up'``) and recomputes the element-wise part in the backward
      pass. No matmul is recomputed. ``False`` gives plain autodiff (the
      checkpoint names stay, for policies of the caller's own).
    rngs: ``params`` initialises the weights; ``dropout`` (or ``default``)
      is kept for dropout when ``dropout_rate > 0``."""

_CALL_DOC = """Applies the layer.

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


def _gated_forward(layer: GatedFFN, x: Array, key: Array | None) -> Array:
  dtype, pet = layer._dtypes(x)
  if layer.gate_up_proj is not None:
    gate_up_proj = layer.gate_up_proj

    def gate_up(x):
      y = gate_up_proj(x, dtype=dtype, preferred_element_type=pet)
      return ffn_common.split_fused(y)
  else:
    gate_proj = cast(Projection, layer.gate_proj)
    up_proj = cast(Projection, layer.up_proj)

    def gate_up(x):
      return (
        gate_proj(x, dtype=dtype, preferred_element_type=pet),
        up_proj(x, dtype=dtype, preferred_element_type=pet),
      )

  return ffn_common.gated_body(
    x,
    gate_up=gate_up,
    down=lambda h: layer.down_proj(h, dtype=dtype),
    activation=layer.activation,
    parametric=isinstance(layer.activation, nnx.Module),
    constrain=sharding.constrain_hidden,
    dropout_rate=layer.dropout_rate,
    dropout_key=key,
    dropout_broadcast_dims=layer.dropout_broadcast_dims,
  )


class GatedFFN(_Base):
  r"""A gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

  .. math::
    y = \left(\mathrm{act}(x W_g + b_g) \odot (x W_u + b_u)\right) W_d + b_d

  The layer of LLaMA, Mistral, Qwen, T5.1.1 and Gemma. Attributes
  ``gate_proj``, ``up_proj`` (kernels ``(in, hidden)``) and ``down_proj``
  (``(hidden, out)``), or with ``fused_gate_up`` a single ``gate_up_proj``
  kernel ``(in, 2, hidden)`` that computes the same numbers in one matmul
  (``gate_proj`` and ``up_proj`` are then ``None``). **No biases by
  default** (LLaMA, Gemma, Mistral have none).

  The backward pass keeps two hidden-sized arrays (the gate and up
  pre-activations) with ``remat=True``; the hidden activation is recomputed.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``); see
      :func:`flaxact.ffn_hidden_features`.
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
    fused_gate_up: one fused ``gate_up_proj`` projection instead of
      ``gate_proj`` and ``up_proj``.
  """

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
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: Callable[..., Array] | None = None,
    activations_in_float32: bool = False,
    fused_gate_up: bool = False,
    remat: bool = True,
    rngs: nnx.Rngs,
  ):
    options = dict(locals())
    self._setup(in_features, hidden_features, out_features, options)
    d, h = self.in_features, self.hidden_features
    self.gate_proj: Projection | None
    self.up_proj: Projection | None
    self.gate_up_proj: Projection | None
    if fused_gate_up:
      self.gate_proj = nnx.data(None)
      self.up_proj = nnx.data(None)
      self.gate_up_proj = self._proj(d, (2, h), _FUSED_AXES, options)
    else:
      self.gate_proj = self._proj(d, (h,), _IN_AXES, options)
      self.up_proj = self._proj(d, (h,), _IN_AXES, options)
      self.gate_up_proj = nnx.data(None)
    self.down_proj = self._proj(h, (self.out_features,), _OUT_AXES, options)

  def __call__(
    self,
    x: Array,
    *,
    deterministic: bool | None = None,
    rngs: Any = None,
  ) -> Array:
    x = ffn_common.check_input(x, type(self).__name__, self.in_features)
    key = self._dropout_key(deterministic, rngs)
    forward = functools.partial(_gated_forward, self)
    if self.remat:
      forward = jax.checkpoint(forward, policy=ffn_common.GATED_REMAT_POLICY)
    return forward(x, key)

  __call__.__doc__ = _CALL_DOC


GatedFFN.__doc__ = (
  (GatedFFN.__doc__ or '').rstrip()
  + _OPTIONS_DOC
  + """

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
)


class SwiGLU(GatedFFN):
  """The SwiGLU FFN of LLaMA, Mistral and PaLM: :class:`GatedFFN` with silu.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
    **kw: every keyword argument of :class:`GatedFFN` except
      ``activation``, with the same defaults (``rngs`` is required).

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

  def __init__(self, in_features, hidden_features, out_features=None, **kw):
    _no_activation('SwiGLU', kw)
    super().__init__(
      in_features, hidden_features, out_features, activation='silu', **kw
    )


class GeGLU(GatedFFN):
  """GeGLU FFN: :class:`GatedFFN` with the **exact** (erf) GELU.

  For the tanh form of T5.1.1 and Gemma use
  ``GatedFFN(..., activation='gelu_tanh')``.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
    **kw: every keyword argument of :class:`GatedFFN` except
      ``activation``, with the same defaults (``rngs`` is required).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.GeGLU(32, 128, 8, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 32))).shape
    (4, 8)
  """

  def __init__(self, in_features, hidden_features, out_features=None, **kw):
    _no_activation('GeGLU', kw)
    super().__init__(
      in_features, hidden_features, out_features, activation='gelu', **kw
    )


class ReGLU(GatedFFN):
  """ReGLU FFN: :class:`GatedFFN` with ReLU.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
    **kw: every keyword argument of :class:`GatedFFN` except
      ``activation``, with the same defaults (``rngs`` is required).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.ReGLU(32, 128, use_bias=True, rngs=nnx.Rngs(0))
    >>> layer.gate_proj.bias.shape
    (128,)
  """

  def __init__(self, in_features, hidden_features, out_features=None, **kw):
    _no_activation('ReGLU', kw)
    super().__init__(
      in_features, hidden_features, out_features, activation='relu', **kw
    )


def _no_activation(layer: str, kw: dict[str, Any]) -> None:
  if 'activation' in kw:
    raise TypeError(
      f'{layer} fixes its activation; got activation={kw["activation"]!r}.'
      ' Use GatedFFN(..., activation=...) for another activation.'
    )


def _ffn_forward(layer: FFN, x: Array, key: Array | None) -> Array:
  dtype, pet = layer._dtypes(x)
  return ffn_common.ffn_body(
    x,
    up=lambda x: layer.up_proj(x, dtype=dtype, preferred_element_type=pet),
    down=lambda h: layer.down_proj(h, dtype=dtype),
    activation=layer.activation,
    constrain=sharding.constrain_hidden,
    dropout_rate=layer.dropout_rate,
    dropout_key=key,
    dropout_broadcast_dims=layer.dropout_broadcast_dims,
  )


class FFN(_Base):
  r"""A plain feed-forward block: ``down_proj(act(up_proj(x)))``.

  .. math::
    y = \mathrm{act}(x W_u + b_u) W_d + b_d

  The layer of GPT-2, BERT, ViT and T5 v1.0. Attributes ``up_proj``
  (kernel ``(in, hidden)``) and ``down_proj`` (``(hidden, out)``). **Biases
  by default** (GPT-2, BERT, ViT have them; pass ``use_bias=False`` for T5)
  and the **exact** GELU by default. With ``remat=True`` the backward pass
  keeps one hidden-sized array, the pre-activation.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: the hidden width (``'mlp'``).
    out_features: the output width; ``None`` (default) uses
      ``in_features``.
  """

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
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: Callable[..., Array] | None = None,
    activations_in_float32: bool = False,
    remat: bool = True,
    rngs: nnx.Rngs,
  ):
    options = dict(locals())
    self._setup(in_features, hidden_features, out_features, options)
    d, h = self.in_features, self.hidden_features
    self.up_proj = self._proj(d, (h,), _IN_AXES, options)
    self.down_proj = self._proj(h, (self.out_features,), _OUT_AXES, options)

  def __call__(
    self,
    x: Array,
    *,
    deterministic: bool | None = None,
    rngs: Any = None,
  ) -> Array:
    x = ffn_common.check_input(x, type(self).__name__, self.in_features)
    key = self._dropout_key(deterministic, rngs)
    forward = functools.partial(_ffn_forward, self)
    if self.remat:
      forward = jax.checkpoint(forward, policy=ffn_common.FFN_REMAT_POLICY)
    return forward(x, key)

  __call__.__doc__ = _CALL_DOC


FFN.__doc__ = (
  (FFN.__doc__ or '').rstrip()
  + _OPTIONS_DOC
  + """

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.FFN(16, 64, activation='gelu_new',  # GPT-2's MLP
    ...                rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16))).shape
    (2, 16)
"""
)
