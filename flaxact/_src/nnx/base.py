"""The NNX layer bases: shared options, dropout, remat, repr.

:class:`LayerBase` keeps the options every layer shares (widths,
activation, ``dtype``, ``remat``) and the calls built on them: the remat
wrapper (``nnx.remat``, so state that a quantization library creates or
updates inside the layer — Qwix's quantized weights, statistics, LoRA rng
counts — crosses the remat boundary correctly) and a readable ``repr``.
:class:`FFNBase` adds dropout and ``activations_in_float32`` for the dense
FFN layers (``MoE`` has neither). A new layer family subclasses one, calls
its ``init_options`` in ``__init__`` and :meth:`LayerBase.run` in
``__call__``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx
from flax.nnx import reprlib
from flax.typing import Dtype

from flaxact._src.common import checks
from flaxact._src.layers import ffn_body, projection, remat

Array = jax.Array


def _state_writable(module: nnx.Module) -> bool:
  """Whether ``module``'s variables can be updated at the current trace."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      return bool(getattr(node, '_can_update', True))
  return True


_DROPOUT_ATTRS = ('dropout_broadcast_dims', 'deterministic', 'rngs')


def keep_stream(rngs: nnx.Rngs, rate: float) -> nnx.RngStream | None:
  """The ``'dropout'`` (or ``'default'``) stream forked, when ``rate > 0``.

  What a layer keeps at construction for its training-mode randomness
  (dropout, the ``MoE`` router's jitter noise).
  """
  if not rate:
    return None
  try:
    return rngs['dropout'].fork()
  except KeyError:
    return None


def training_key(
  layer: Any,
  what: str,
  option: str,
  rate: float,
  deterministic: bool | None,
  rngs: Any,
) -> Array | None:
  """The key of this call's training-mode randomness, or ``None``.

  As ``nnx.Dropout``: none when ``rate`` is 0 or the call is deterministic
  (the call's ``deterministic``, else the layer's attribute); otherwise a
  key from ``rngs`` given at the call (``nnx.Rngs``, ``RngStream`` or key)
  or from the stream the layer kept (``layer.rngs``).

  Raises:
    ValueError: in training mode without an rng; the message names
      ``what`` and ``option=rate``.
  """
  if not rate:
    return None
  if deterministic is None:
    deterministic = layer.deterministic
  if deterministic:
    return None
  given = rngs
  if rngs is None:
    rngs = layer.rngs
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
    f'{type(layer).__name__}: {what} in training mode (deterministic=False,'
    f' {option}={rate}) needs an rng: construct the layer'
    ' with rngs=nnx.Rngs(params=..., dropout=...) or pass rngs= (an'
    f' nnx.Rngs, RngStream or key) to the call; got {got}. For inference'
    ' use deterministic=True or layer.eval().'
  )


class LayerBase(nnx.Module):
  """Widths, activation, dtype, remat and ``repr`` shared by the NNX layers.

  Subclasses set ``remat_names`` (the checkpoint names :meth:`run` saves)
  and call :meth:`init_layer` (or :meth:`FFNBase.init_options`).
  """

  #: Checkpoint names that :meth:`run` saves under remat (subclasses set
  #: theirs; see :mod:`flaxact._src.layers.remat`).
  remat_names: ClassVar[tuple[str, ...]] = ()

  def init_layer(
    self,
    *,
    in_features: int,
    hidden_features: int,
    out_features: int | None,
    activation: str | Callable[..., Any],
    dtype: Dtype | None,
    remat: bool,
  ) -> None:
    """Checks and stores the widths, activation, dtype and remat.

    Raises:
      ValueError: for a width that is not a positive integer or an unknown
        activation name.
      TypeError: for an activation that is neither a name nor a callable.
    """
    name = type(self).__name__
    self.in_features = checks.check_positive_int(
      in_features, 'in_features', name
    )
    self.hidden_features = checks.check_positive_int(
      hidden_features, 'hidden_features', name
    )
    if out_features is None:
      out_features = in_features
    self.out_features = checks.check_positive_int(
      out_features, 'out_features', name
    )
    fn = ffn_body.resolve_activation(activation, name)
    self.activation = activation if isinstance(activation, nnx.Module) else fn
    self.dtype = dtype
    self.remat = remat

  def run(
    self, forward: Callable[..., Any], x: Array, key: Array | None, *args: Any
  ) -> Any:
    """Calls ``forward(self, x, key, *args)``; with remat, ``nnx.remat``.

    The policy saves only the class's ``remat_names``. ``nnx.remat`` (not
    ``jax.checkpoint`` over a closure of the module) lets the module's state
    change inside the checkpointed call. Where a plain JAX transform
    (``jax.jit``, ``jax.grad``) closes over the layer, its variables belong
    to an outer trace and cannot be written back: there the call runs under
    ``jax.checkpoint`` with the same policy.
    """
    if not self.remat:
      return forward(self, x, key, *args)
    policy = remat.save_only(self.remat_names)
    if _state_writable(self):
      return nnx.remat(forward, policy=policy)(self, x, key, *args)
    closure = functools.partial(forward, self)
    return jax.checkpoint(closure, policy=policy)(x, key, *args)

  def __nnx_repr__(self):
    """Shows the activation by name."""
    for item in super().__nnx_repr__():
      if (
        isinstance(item, reprlib.Attr)
        and item.key == 'activation'
        and not isinstance(self.activation, nnx.Module)
      ):
        item = dataclasses.replace(
          item, value=ffn_body.ActivationName(self.activation)
        )
      yield item


class FFNBase(LayerBase):
  """:class:`LayerBase` with dropout and ``activations_in_float32``.

  The keyword arguments every flaxact NNX dense FFN layer takes:

  Args:
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
    dot_general: replaces :func:`jax.lax.dot_general` in every projection
      (e.g. a fake-quantizing function or AQT's functional
      ``aqt_dot_general.make_dot_general(cfg)``). Qwix needs no hook: it
      intercepts ``jax.lax.dot_general`` and ``promote_dtype`` itself.
    dot_general_cls: a class (or factory) whose instances replace
      ``dot_general``, one instance per projection, kept as the
      projection's ``dot_general`` attribute (an ``nnx.Module`` instance
      keeps its own state).
    activations_in_float32: for half-precision ``dtype``, the hidden-sized
      projections return float32 and the element-wise part (activation,
      product, dropout) runs in float32; the hidden activation is rounded
      to ``dtype`` once, for ``down_proj``. The saved pre-activations are
      then float32 (twice the memory). Holds under any ``dot_general``: the
      projection's output is cast to float32 when a hook ignores
      ``preferred_element_type``.
    remat: memory-lean backward: run the body under ``nnx.remat`` with a
      policy that saves only the pre-activations (``'ffn_gate'``,
      ``'ffn_up'``) and recomputes the element-wise part in the backward
      pass. No matmul is recomputed. ``False`` gives plain autodiff (the
      checkpoint names stay, for policies of the caller's own).
    rngs: ``params`` initialises the weights; ``dropout`` (or ``default``)
      is kept for dropout when ``dropout_rate > 0``.
  """

  def init_options(
    self,
    *,
    in_features: int,
    hidden_features: int,
    out_features: int | None,
    activation: str | Callable[..., Any],
    dropout_rate: float,
    dropout_broadcast_dims: Sequence[int],
    deterministic: bool,
    dtype: Dtype | None,
    activations_in_float32: bool,
    remat: bool,
    rngs: nnx.Rngs,
  ) -> None:
    """Checks and stores the shared options as attributes.

    Raises:
      ValueError: for a width that is not a positive integer, an unknown
        activation name or a dropout rate outside ``[0, 1]``.
      TypeError: for an activation that is neither a name nor a callable.
    """
    self.init_layer(
      in_features=in_features,
      hidden_features=hidden_features,
      out_features=out_features,
      activation=activation,
      dtype=dtype,
      remat=remat,
    )
    self.dropout_rate, self.dropout_broadcast_dims = checks.check_dropout(
      dropout_rate, dropout_broadcast_dims, type(self).__name__
    )
    self.deterministic = deterministic
    self.activations_in_float32 = activations_in_float32
    self.rngs = nnx.data(keep_stream(rngs, self.dropout_rate))

  def dtypes(self, x: Array) -> tuple[np.dtype, np.dtype | None]:
    """``(compute dtype, hidden projections' matmul output dtype)``."""
    dtype = projection.layer_dtype(x, self.dtype)
    return dtype, projection.hidden_projection_dtype(
      dtype, self.activations_in_float32
    )

  def dropout_key(self, deterministic: bool | None, rngs: Any) -> Array | None:
    """The dropout key for this call, or ``None`` when no dropout applies.

    Raises:
      ValueError: for dropout in training mode without an rng.
    """
    return training_key(
      self, 'dropout', 'dropout_rate', self.dropout_rate, deterministic, rngs
    )

  def __nnx_repr__(self):
    """Hides the dropout options when ``dropout_rate == 0`` (unused)."""
    for item in super().__nnx_repr__():
      if (
        isinstance(item, reprlib.Attr)
        and self.dropout_rate == 0
        and item.key in _DROPOUT_ATTRS
      ):
        continue
      yield item
