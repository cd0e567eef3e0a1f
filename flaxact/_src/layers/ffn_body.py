"""The framework-free body of the FFN layers, shared by Linen and NNX.

Both :mod:`flaxact.linen` and :mod:`flaxact.nnx` declare their parameters in
their own way and then call the functions here on plain arrays, so the two
APIs run the same operations in the same order and, given the same weights,
return exactly equal outputs. The checkpoint names and remat policies are in
:mod:`flaxact._src.layers.remat`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.activations.gated_product import gated_product
from flaxact._src.activations.registry import (
  ACTIVATIONS,
  GATED_NAMES,
  get_activation,
)
from flaxact._src.layers import remat

Array = jax.Array
#: An activation: a registered name or a callable.
Activation = str | Callable[..., Any]

_SPLIT_FORM = frozenset(id(ACTIVATIONS[name]) for name in GATED_NAMES)


def resolve_activation(activation: Any, owner: str) -> Callable[..., Any]:
  """Resolves a registry name to its function; callables pass unchanged.

  Args:
    activation: a registry name or a callable (a function or a learnable
      activation module).
    owner: the layer's name, for error messages.

  Returns:
    The element-wise activation.

  Raises:
    ValueError: for a name not in the registry (the message lists the valid
      names) or a split-form gated name such as ``'swiglu'``.
    TypeError: if ``activation`` is neither a string nor a callable.
  """
  if not isinstance(activation, str) and not callable(activation):
    raise TypeError(
      f'{owner}: activation must be a registry name or a callable; got'
      f' {activation!r} ({type(activation).__name__}).'
    )
  try:
    fn = get_activation(activation)
  except ValueError as e:
    raise ValueError(f'{owner}: {e}') from None
  if id(fn) in _SPLIT_FORM:
    raise ValueError(
      f'{owner}: activation must be element-wise; got the split-form gated'
      f' function {activation!r}, which halves its input. Use the gated'
      ' layer with its element-wise activation instead (SwiGLU or'
      " GatedFFN(activation='silu'), GeGLU, ReGLU)."
    )
  return fn


class ActivationName:
  """Shows an activation by its registry name in a layer's ``repr``."""

  def __init__(self, activation: Any):
    self.text = activation_name(activation)

  def __repr__(self) -> str:
    return self.text


def activation_name(activation: Any) -> str:
  """A readable name of an activation, for ``repr``.

  Registry functions show as their canonical registry name, partials as
  ``name(param=value)``; strings are quoted; anything else (a learnable
  activation module, another callable) shows its own ``repr`` or name.

  Examples:
    >>> import flaxact
    >>> activation_name(flaxact.silu)
    "'silu'"
    >>> activation_name(flaxact.get_activation('leaky_relu',
    ...                                        negative_slope=0.2))
    "'leaky_relu'(negative_slope=0.2)"
  """
  if isinstance(activation, str):
    return repr(activation)
  if isinstance(activation, functools.partial):
    args = ', '.join(f'{k}={v!r}' for k, v in activation.keywords.items())
    return f'{activation_name(activation.func)}({args})'
  for name, fn in ACTIVATIONS.items():
    if fn is activation:
      return repr(name)
  return getattr(activation, '__qualname__', None) or repr(activation)


def dropout(
  h: Array, rate: float, key: Array | None, broadcast_dims: Sequence[int]
) -> Array:
  """Inverted dropout with an optional mask broadcast over some dimensions."""
  if key is None or rate == 0.0:
    return h
  if rate == 1.0:
    return jnp.zeros_like(h)
  keep = 1.0 - rate
  shape = list(h.shape)
  for d in broadcast_dims:
    shape[d] = 1
  mask = jax.random.bernoulli(key, p=keep, shape=tuple(shape))
  mask = jnp.broadcast_to(mask, h.shape)
  return jnp.where(mask, h / jnp.asarray(keep, h.dtype), jnp.zeros_like(h))


def gated_body(
  x: Array,
  *,
  gate_up: Callable[[Array], tuple[Array, Array]],
  down: Callable[[Array], Array],
  activation: Callable[[Array], Array],
  parametric: bool,
  constrain: Callable[[Array], Array],
  dropout_rate: float,
  dropout_key: Array | None,
  dropout_broadcast_dims: Sequence[int],
) -> Array:
  """``down(dropout(act(gate) * up))`` with checkpoint names and constraints.

  Args:
    x: input, shape ``(..., in_features)``.
    gate_up: returns the gate and up projections of ``x``.
    down: the down projection.
    activation: element-wise activation of the gate.
    parametric: ``True`` for activations with parameters of their own
      (computed as ``act(gate) * up``); otherwise the lean
      :func:`flaxact.gated_product` is used.
    constrain: sharding constraint for hidden-sized arrays.
    dropout_rate: dropout rate on the hidden activation.
    dropout_key: the dropout key, or ``None`` for no dropout.
    dropout_broadcast_dims: dimensions the dropout mask is shared over.

  Returns:
    The output, shape ``(..., out_features)``.
  """
  gate, up = gate_up(x)
  gate = checkpoint_name(constrain(gate), remat.GATE)
  up = checkpoint_name(constrain(up), remat.UP)
  if parametric:
    h = (activation(gate) * up).astype(gate.dtype)
  else:
    h = gated_product(gate, up, activation)
  h = checkpoint_name(constrain(h), remat.HIDDEN)
  h = dropout(h, dropout_rate, dropout_key, dropout_broadcast_dims)
  return checkpoint_name(down(h), remat.OUT)


def ffn_body(
  x: Array,
  *,
  up: Callable[[Array], Array],
  down: Callable[[Array], Array],
  activation: Callable[[Array], Array],
  constrain: Callable[[Array], Array],
  dropout_rate: float,
  dropout_key: Array | None,
  dropout_broadcast_dims: Sequence[int],
) -> Array:
  """``down(dropout(act(up(x))))`` with checkpoint names and constraints."""
  u = checkpoint_name(constrain(up(x)), remat.UP)
  h = activation(u).astype(u.dtype)
  h = checkpoint_name(constrain(h), remat.HIDDEN)
  h = dropout(h, dropout_rate, dropout_key, dropout_broadcast_dims)
  return checkpoint_name(down(h), remat.OUT)
