"""Framework-free pieces of the learnable activations (PReLU, Swish)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flaxact._src.common.checks import as_float_array

Array = jax.Array


def param_shape(num_parameters: int) -> tuple[int, ...]:
  """``()`` for a shared parameter, else ``(num_parameters,)``."""
  return () if num_parameters == 1 else (num_parameters,)


def check_channel_input(x: Any, num_parameters: int, layer: str) -> Array:
  """Checks the input: floating dtype; last axis ``num_parameters`` if > 1."""
  x = as_float_array(x)
  if num_parameters > 1 and (x.ndim == 0 or x.shape[-1] != num_parameters):
    raise ValueError(
      f'{layer}: expected input of shape (..., {num_parameters}) for'
      f' num_parameters={num_parameters} (one parameter per channel of the'
      f' last axis); got shape {tuple(x.shape)}.'
    )
  return x


def broadcast(p: Array, x: Array) -> Array:
  """Reshapes a per-channel parameter to broadcast against ``x``."""
  if p.ndim == 0:
    return p
  return jnp.reshape(p, (1,) * (x.ndim - 1) + p.shape)
