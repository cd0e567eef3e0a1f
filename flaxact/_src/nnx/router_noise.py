"""The PRNG key of an NNX ``MoE`` call's router jitter noise.

Like ``nnx.Dropout``: noise applies in training (``deterministic=False``,
the attribute that ``layer.train()``/``layer.eval()`` set, or the call's
argument) and draws from the ``'dropout'`` stream (or ``'default'``) kept
from construction, or from ``rngs=`` given at the call.
"""

from __future__ import annotations

from typing import Any

import jax

from flaxact._src.nnx.base import training_key

Array = jax.Array


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
  return training_key(
    layer,
    'router jitter noise',
    'router_jitter_noise',
    layer.router_jitter_noise,
    deterministic,
    rngs,
  )
