"""Token masks of routed FFNs: which positions hold real tokens.

A ``token_mask`` has the token shape of the input (``x.shape[:-1]``), dtype
``bool``, ``True`` for a real token and ``False`` for padding. Masked tokens
are routed to no expert (the sentinel expert ``E``, which every experts impl
and the expert-parallel exchange already skip), get no routed output and
count in no statistic or loss.

Examples:
  >>> import jax.numpy as jnp
  >>> from flaxact._src.moe.token_mask import check_token_mask
  >>> check_token_mask(jnp.array([True, False]), (2,), 'moe_ffn').dtype
  dtype('bool')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_token_mask(
  token_mask: Any, shape: tuple[int, ...], where: str
) -> Array | None:
  """``token_mask`` as a bool array of ``shape``, or ``None``.

  Args:
    token_mask: ``None`` or a bool array.
    shape: the token shape it must have (``x.shape[:-1]``).
    where: the function or layer, for the messages.

  Raises:
    TypeError: if the mask is not boolean.
    ValueError: if its shape is not ``shape``.
  """
  if token_mask is None:
    return None
  dtype = getattr(token_mask, 'dtype', None)
  if dtype is None:
    token_mask = jnp.asarray(token_mask)
    dtype = token_mask.dtype
  if np.dtype(dtype) != np.dtype(bool):
    raise TypeError(
      f'{where}: token_mask must be a bool array (True = a real token) of'
      f' shape {tuple(shape)}; got dtype {np.dtype(dtype).name}. Compare'
      ' first, e.g. token_mask=attention_mask != 0.'
    )
  if tuple(jnp.shape(token_mask)) != tuple(shape):
    raise ValueError(
      f'{where}: token_mask must have the token shape of the input,'
      f' x.shape[:-1] = {tuple(shape)}; got {tuple(jnp.shape(token_mask))}.'
    )
  return jnp.asarray(token_mask)


def route_experts(experts: Array, token_mask: Array | None, num_experts: int):
  """``experts`` with every masked token's assignments sent to expert ``E``.

  ``experts`` is ``(T, k)`` and ``token_mask`` ``(T,)`` or ``None``.
  """
  if token_mask is None:
    return experts
  return jnp.where(token_mask[:, None], experts, num_experts)
