"""Router jitter noise: multiplicative uniform noise on the router's input.

Switch Transformer's and ``transformers`` Mixtral's ``router_jitter_noise``
``eps``: in training the router sees ``x * u`` with ``u ~ U(1 - eps,
1 + eps)`` drawn per element; the experts see ``x`` unchanged. (Mixtral's
``hidden_states *=`` multiplies in place, so there the experts' input is
jittered too; the Switch Transformer jitters the router's input only, as
flaxact does.)

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flaxact._src.moe.jitter import jitter
  >>> y = jitter(jnp.ones((2, 3)), jax.random.key(0), 0.1)
  >>> bool(((y >= 0.9) & (y <= 1.1)).all())
  True
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def check_jitter(eps: Any, owner: str) -> float:
  """``router_jitter_noise`` as a float in ``[0, 1)``.

  Raises:
    TypeError: for a value that is not a real number.
    ValueError: for a negative, non-finite or ``>= 1`` value (a factor
      ``1 - eps <= 0`` could zero or flip the router's input).
  """
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
    raise TypeError(
      f'{owner}: router_jitter_noise must be a number in [0, 1); got'
      f' {eps!r} ({type(eps).__name__}).'
    )
  if not (math.isfinite(float(eps)) and 0 <= float(eps) < 1):
    raise ValueError(
      f'{owner}: router_jitter_noise must be in [0, 1) (0: no noise); got'
      f' {eps!r}.'
    )
  return float(eps)


def jitter(x: Array, key: Array, eps: float) -> Array:
  """``x * u``, ``u ~ U(1 - eps, 1 + eps)`` per element, in (at least) f32.

  The router computes in float32, so the noisy input is not rounded back to
  a half-precision ``x``'s dtype.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  u = jax.random.uniform(key, x.shape, dtype, 1.0 - eps, 1.0 + eps)
  return x.astype(dtype) * u


def check_noise(eps: Any, key: Any, router_logits: Any) -> float:
  """``moe_ffn``'s ``router_jitter_noise``, checked with its ``key``.

  Raises:
    TypeError: for a value that is not a real number.
    ValueError: for a value outside ``[0, 1)``, or noise without ``key`` or
      with ``router_logits`` (computed by the caller, past the input).
  """
  eps = check_jitter(eps, 'moe_ffn')
  if eps and key is None:
    raise ValueError(
      f'moe_ffn: router_jitter_noise={eps} needs key= (a PRNG key, in'
      ' training); got key=None. For inference pass router_jitter_noise=0.0.'
    )
  if eps and router_logits is not None:
    raise ValueError(
      f'moe_ffn: router_jitter_noise={eps} jitters the router input, but'
      ' router_logits were given (computed by the caller); jitter the'
      ' router input before computing them instead.'
    )
  return eps
