"""GPT-OSS's clamped gated product for routed expert FFNs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flaxact._src.common.checks import (
  as_float_array,
  check_same_shape,
  compute_dtype,
)
from flaxact._src.common.derivative import copy_behind_barrier as fresh

Array = jax.Array


def _parts(gate, up, alpha, limit):
  g = jnp.minimum(gate, limit)
  u = jnp.clip(up, -limit, limit)
  s = jax.nn.sigmoid(alpha * g)
  return g, u, s


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _glu(gate: Array, up: Array, alpha: float, limit: float) -> Array:
  g, u, s = _parts(gate, up, alpha, limit)
  return (u + 1) * (g * s)


@_glu.defjvp
def _glu_jvp(alpha, limit, primals, tangents):
  gate, up = primals
  t_gate, t_up = tangents
  out = _glu(gate, up, alpha, limit)
  g, u, s = _parts(fresh(gate), fresh(up), alpha, limit)
  # PyTorch's clamp passes the gradient at the bounds themselves.
  d_gate = jnp.where(gate <= limit, (u + 1) * s * (1 + alpha * g * (1 - s)), 0)
  d_up = jnp.where(jnp.abs(up) <= limit, g * s, 0)
  return out, d_gate * t_gate + d_up * t_up


def gpt_oss_glu(
  gate: ArrayLike,
  up: ArrayLike,
  *,
  alpha: float = 1.702,
  limit: float = 7.0,
) -> Array:
  r"""GPT-OSS's clamped gated product of its expert FFNs.

  .. math::
    \mathrm{gpt\_oss\_glu}(g, u) = (\mathrm{clip}(u, -L, L) + 1)\,
    \hat g\,\sigma(\alpha \hat g), \qquad \hat g = \min(g, L)

  Use it as a MoE layer's ``gated_product`` (``functools.partial(
  flaxact.gpt_oss_glu, alpha=1.702, limit=7.0)``). The derivative is written
  by hand (clamps pass the gradient at their bounds, as ``torch.clamp``
  does) so the backward pass keeps the two inputs only. Half-precision
  inputs are computed in float32 and rounded once.

  Args:
    gate: gate pre-activation, shape ``(..., h)``, floating dtype.
    up: up projection, the same shape and dtype as ``gate``.
    alpha: the sigmoid's slope (GPT-OSS: 1.702).
    limit: the clamp ``L`` (GPT-OSS: 7.0).

  Returns:
    An array of shape ``(..., h)`` in the dtype of the inputs.

  Raises:
    ValueError: if the shapes differ or ``limit`` is not positive.
    TypeError: for integer inputs or differing dtypes.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.gpt_oss_glu(jnp.array([0.0, 20.0]), jnp.array([3.0, -1.0]))
    Array([0., 0.], dtype=float32)

  References:
    OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025.
  """
  gate = as_float_array(gate, 'gate')
  up = as_float_array(up, 'up')
  check_same_shape(gate, up)
  if gate.dtype != up.dtype:
    raise TypeError(
      f'gate and up must have the same dtype; got gate {gate.dtype.name} and'
      f' up {up.dtype.name}.'
    )
  if not limit > 0:
    raise ValueError(f'gpt_oss_glu: limit must be positive; got {limit}.')
  ctype = compute_dtype(gate.dtype)
  out = _glu(gate.astype(ctype), up.astype(ctype), float(alpha), float(limit))
  return out.astype(gate.dtype)
