"""The Linen layer bases: shared options, dropout, remat, repr.

:class:`LayerBase` carries the options every layer shares (the projection
options, ``dtype``, ``remat``) as typed dataclass fields, and the calls
built on them: building projections, the input-width check, the remat
wrapper and a readable ``repr``. :class:`FFNBase` adds dropout and
``activations_in_float32`` for the dense FFN layers (``MoE`` has neither).
A new layer family subclasses one, declares its own positional fields and
its ``activation`` default, and implements ``_forward(x, key)``
(``nn.compact``); ``FFNBase.__call__`` checks the input, draws the dropout
key and runs ``_forward`` under remat with the class's ``remat_names``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.common import checks
from flaxact._src.layers import ffn_body, projection, remat
from flaxact._src.layers.projection import ProjectionOptions
from flaxact._src.linen.projection import (
  Projection,
  default_bias_init,
  default_kernel_init,
)

Array = jax.Array


class LayerBase(nn.Module):
  """Projection options, input check, remat and ``repr`` of the Linen layers.

  Attributes:
    use_bias: add biases to the projections.
    dtype: the compute dtype; ``None`` (default) uses the input's dtype, so
      the output has the input's dtype.
    param_dtype: the dtype of the parameters (default float32).
    precision: matmul precision, passed to ``dot_general``.
    kernel_init: kernel initialiser; default LeCun normal, as ``nn.Dense``.
    bias_init: bias initialiser; default zeros.
    dot_general: replaces :func:`jax.lax.dot_general` in every projection
      (e.g. a fake-quantizing function or AQT's functional
      ``aqt_dot_general.make_dot_general(cfg)``). Qwix needs no hook: it
      intercepts ``jax.lax.dot_general`` and ``promote_dtype`` itself.
    dot_general_cls: a class whose instances replace ``dot_general``, one
      instance per projection, as ``nn.Dense(dot_general_cls=...)``: e.g.
      ``functools.partial(aqt_flax.AqtDotGeneral, cfg)``.
    remat: memory-lean backward: run the body under ``nn.checkpoint`` with a
      policy that saves only the pre-activations (the class's
      ``remat_names``, e.g. ``'ffn_gate'``, ``'ffn_up'``) and recomputes the
      element-wise part in the backward pass. No matmul is recomputed.
      ``False`` gives plain autodiff (the checkpoint names stay, for
      policies of the caller's own).
  """

  _: dataclasses.KW_ONLY
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  dot_general: DotGeneralT | None = None
  dot_general_cls: projection.DotGeneralCls | None = None
  remat: bool = True

  #: Names of the projections whose kernels are ``(in_features, ...)``.
  input_projections: ClassVar[tuple[str, ...]] = (
    'gate_proj',
    'gate_up_proj',
    'up_proj',
  )

  #: Checkpoint names that :meth:`run` saves under remat (subclasses set
  #: theirs; see :mod:`flaxact._src.layers.remat`).
  remat_names: ClassVar[tuple[str, ...]] = ()

  @property
  def projection_options(self) -> ProjectionOptions:
    """The options of every projection of this layer."""
    return ProjectionOptions(
      use_bias=self.use_bias,
      param_dtype=self.param_dtype,
      precision=self.precision,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      dot_general=self.dot_general,
      dot_general_cls=self.dot_general_cls,
    )

  @property
  def hooked(self) -> bool:
    """Whether a ``dot_general``/``dot_general_cls`` hook is set."""
    return self.dot_general is not None or self.dot_general_cls is not None

  def check_input(self, x: Any) -> Array:
    """Checks ``x``: floating, rank >= 1, and once initialised, its width.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if the last axis of ``x`` differs from the input width of
        the kernels the layer was initialised with.
    """
    name = type(self).__name__
    in_features = None
    params = self.variables.get('params', {}) if self.scope else {}
    for proj in self.input_projections:
      kernel = nn.unbox(params.get(proj, {}).get('kernel'))
      shape = getattr(kernel, 'shape', None)
      if shape:
        in_features = int(shape[0])
        break
    return checks.check_layer_input(x, name, in_features)

  def run(
    self, forward: Callable[..., Any], x: Array, key: Array | None, *args: Any
  ) -> Any:
    """Calls the unbound method ``forward(self, x, key, *args)``, under remat.

    With ``remat`` the call runs under ``nn.checkpoint`` with the policy
    that saves only the class's ``remat_names``.
    """
    if self.remat:
      policy = remat.save_only(self.remat_names)
      forward = nn.checkpoint(forward, policy=policy)
    return forward(self, x, key, *args)

  def projection(
    self,
    name: str,
    features: tuple[int, ...],
    axes: tuple[tuple[Any, ...], tuple[Any, ...]],
    dtype: Dtype,
    preferred_element_type: Dtype | None = None,
    *,
    use_bias: bool | None = None,
  ) -> Projection:
    """A :class:`Projection` named ``name`` with this layer's options.

    ``use_bias`` (when not ``None``) replaces the layer's.
    """
    options = self.projection_options
    if use_bias is not None:
      options = dataclasses.replace(options, use_bias=use_bias)
    return Projection(
      features=features,
      kernel_axes=axes[0],
      bias_axes=axes[1],
      options=options,
      dtype=dtype,
      preferred_element_type=preferred_element_type,
      name=name,
    )

  def repr_fields(self) -> list[dataclasses.Field]:
    """The fields :meth:`__repr__` shows, in the order it shows them."""
    fields = [
      f
      for f in dataclasses.fields(self)
      if f.init and f.name not in ('parent', 'name', '_')
    ]
    fields.sort(key=lambda f: (bool(f.kw_only), f.name != 'activation'))
    return fields

  def __repr__(self) -> str:
    """The constructor arguments, positional ones first.

    The activation shows by its registry name.
    """
    parts = []
    for f in self.repr_fields():
      value = getattr(self, f.name)
      if f.name == 'activation':
        text = ffn_body.activation_name(value)
      else:
        text = short_repr(value)
      parts.append(f'{f.name}={text}')
    return f'{type(self).__name__}({", ".join(parts)})'


class FFNBase(LayerBase):
  """``LayerBase`` with dropout and ``activations_in_float32``.

  The base of the dense FFN layers. Subclasses declare their positional
  fields (``hidden_features``, ...) and ``activation`` with its default,
  and implement ``_forward(x, key)`` decorated with ``nn.compact``. The
  other options (``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
  initialisers, ``dot_general``, ``dot_general_cls``, ``remat``) are
  documented on ``LayerBase``.

  Attributes:
    dropout_rate: dropout rate on the hidden activation (before
      ``down_proj``).
    dropout_broadcast_dims: dimensions of the hidden activation over which
      one dropout mask is shared (as ``nn.Dropout``'s ``broadcast_dims``).
    deterministic: default of the call's ``deterministic`` (only needed when
      ``dropout_rate > 0``).
    activations_in_float32: for half-precision ``dtype``, the hidden-sized
      projections return float32 and the element-wise part (activation,
      product, dropout) runs in float32; the hidden activation is rounded
      to ``dtype`` once, for ``down_proj``. The saved pre-activations are
      then float32 (twice the memory). Holds under any ``dot_general``: the
      projection's output is cast to float32 when a hook ignores
      ``preferred_element_type``.
  """

  _: dataclasses.KW_ONLY
  dropout_rate: float = 0.0
  dropout_broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  activations_in_float32: bool = False

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
      ValueError: if the last axis of ``x`` is not the width the layer was
        initialised with, or for dropout in training mode without a
        ``'dropout'`` rng.
    """
    x = self.check_input(x)
    key = self.dropout_key(deterministic)
    return self.run(type(self)._forward, x, key)

  def _forward(self, x: Array, key: Array | None) -> Array:
    """The layer body; subclasses implement it (``nn.compact``)."""
    raise NotImplementedError(f'{type(self).__name__} defines no _forward.')

  def validate_options(self, activation: Any, **widths: int | None) -> None:
    """Checks the shared options and the given widths (``None`` skips one).

    Raises:
      ValueError: for a width that is not a positive integer, an unknown
        activation name or a dropout rate outside ``[0, 1]``.
      TypeError: for an activation that is neither a name nor a callable.
    """
    name = type(self).__name__
    for key, value in widths.items():
      if value is not None:
        checks.check_positive_int(value, key, name)
    checks.check_dropout(self.dropout_rate, self.dropout_broadcast_dims, name)
    ffn_body.resolve_activation(activation, name)

  def dropout_key(self, deterministic: bool | None) -> Array | None:
    """The dropout key for this call, or ``None`` when no dropout applies.

    Raises:
      ValueError: if ``dropout_rate > 0`` and neither the call nor the
        constructor says ``deterministic``, or training mode has no
        ``'dropout'`` rng.
    """
    name = type(self).__name__
    rate = self.dropout_rate
    if rate == 0.0:
      return None
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic is None:
      raise ValueError(
        f'{name}(dropout_rate={rate}) needs deterministic=True (inference) or'
        ' deterministic=False (training), in the constructor or the call;'
        ' got neither.'
      )
    if deterministic:
      return None
    if not self.has_rng('dropout'):
      raise ValueError(
        f'{name}: dropout in training mode (deterministic=False,'
        f" dropout_rate={rate}) needs a 'dropout' rng, e.g."
        " layer.apply(variables, x, deterministic=False, rngs={'dropout':"
        ' key}); got none.'
      )
    return self.make_rng('dropout')

  def repr_fields(self) -> list[dataclasses.Field]:
    """The fields shown; the dropout options only when ``dropout_rate > 0``.

    Where ``dropout_rate == 0`` they do nothing.
    """
    fields = super().repr_fields()
    if self.dropout_rate == 0:
      fields = [f for f in fields if f.name not in _DROPOUT_FIELDS]
    return fields


_DROPOUT_FIELDS = ('dropout_broadcast_dims', 'deterministic')


def short_repr(value: Any) -> str:
  if value is None or isinstance(value, (str, bool, int, float, tuple)):
    return repr(value)
  try:
    return np.dtype(value).name
  except TypeError:
    return getattr(value, '__name__', repr(value))
