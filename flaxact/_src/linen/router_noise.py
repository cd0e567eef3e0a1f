"""The PRNG key of a Linen ``MoE`` call's router jitter noise.

Like ``nn.Dropout``: noise applies in training (``deterministic=False``, in
the constructor or the call) and draws from the ``'dropout'`` rng.
"""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array


def jitter_key(layer: Any, deterministic: bool | None) -> Array | None:
  """The key of this call's jitter noise, or ``None`` for no noise.

  Args:
    layer: a bound Linen ``MoE`` (``router_jitter_noise``,
      ``deterministic``).
    deterministic: the call's argument; ``None`` uses the attribute.

  Raises:
    ValueError: with ``router_jitter_noise > 0``, if neither the call nor
      the constructor says ``deterministic``, or training mode has no
      ``'dropout'`` rng.
  """
  eps = layer.router_jitter_noise
  if not eps:
    return None
  name = type(layer).__name__
  if deterministic is None:
    deterministic = layer.deterministic
  if deterministic is None:
    raise ValueError(
      f'{name}(router_jitter_noise={eps}) needs deterministic=True'
      ' (inference) or deterministic=False (training), in the constructor or'
      ' the call; got neither.'
    )
  if deterministic:
    return None
  if not layer.has_rng('dropout'):
    raise ValueError(
      f'{name}: router jitter noise in training mode (deterministic=False,'
      f" router_jitter_noise={eps}) needs a 'dropout' rng, e.g."
      " layer.apply(variables, x, deterministic=False, rngs={'dropout':"
      ' key}); got none.'
    )
  return layer.make_rng('dropout')
