"""The PRNG key of an NNX ``MoE`` call's router jitter noise.

Like ``nnx.Dropout``: noise applies in training (``deterministic=False``,
the attribute that ``layer.train()``/``layer.eval()`` set, or the call's
argument) and draws from the ``'dropout'`` stream (or ``'default'``) kept
from construction, or from ``rngs=`` given at the call.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

Array = jax.Array


def keep_stream(rngs: nnx.Rngs, eps: float) -> nnx.RngStream | None:
  """The ``'dropout'`` (or ``'default'``) stream forked, when ``eps > 0``."""
  if not eps:
    return None
  try:
    return rngs['dropout'].fork()
  except KeyError:
    return None


def jitter_key(layer: Any, deterministic: bool | None, rngs: Any):
  """The key of this call's jitter noise, or ``None`` for no noise.

  Args:
    layer: an NNX ``MoE`` (``router_jitter_noise``, ``deterministic``,
      ``rngs``: the kept stream).
    deterministic: the call's argument; ``None`` uses the attribute.
    rngs: the call's ``nnx.Rngs``, ``RngStream`` or key, or ``None``.

  Raises:
    ValueError: for noise in training mode without an rng.
  """
  eps = layer.router_jitter_noise
  if not eps:
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
    f'{type(layer).__name__}: router jitter noise in training mode'
    f' (deterministic=False, router_jitter_noise={eps}) needs an rng:'
    ' construct the layer with rngs=nnx.Rngs(params=..., dropout=...) or'
    f' pass rngs= (an nnx.Rngs, RngStream or key) to the call; got {got}.'
    ' For inference use deterministic=True or layer.eval().'
  )
