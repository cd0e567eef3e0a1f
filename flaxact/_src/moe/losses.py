"""Auxiliary losses of routed FFNs' routers, with optional token masks.

:func:`load_balancing_loss` (Switch Transformer / Mixtral, over all tokens),
:func:`sequence_balance_loss` (DeepSeek-V3's complementary sequence-wise
loss) and :func:`router_z_loss` (ST-MoE). Each takes a ``token_mask``
(``True`` = a real token): masked tokens count in no sum and no mean, so a
padded batch scores what the batch without its padding scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flaxact._src.common.checks import as_float_array, normalise_choice
from flaxact._src.moe.routers import ROUTERS, at_least_f32, check_experts
from flaxact._src.moe.token_mask import check_token_mask

Array = jax.Array


def _weights(token_mask, shape, dtype, where) -> Array | None:
  """The mask as ``dtype`` weights of ``shape``, or ``None``."""
  mask = check_token_mask(token_mask, shape, where)
  return None if mask is None else mask.astype(dtype)


def _clean(logits: Array, m: Array | None) -> Array:
  """Padding's logits set to 0, so no nan or inf there reaches a gradient."""
  if m is None:
    return logits
  return jnp.where(m[..., None] > 0, logits, 0)


def load_balancing_loss(
  router_logits: ArrayLike,
  experts: ArrayLike,
  num_experts: int,
  *,
  token_mask: ArrayLike | None = None,
) -> Array:
  r"""The Switch Transformer / Mixtral load-balancing loss of one layer.

  .. math::
    L = E \sum_e f_e P_e

  with ``f_e`` the fraction of tokens whose top-k includes expert ``e`` (the
  ``f_e`` sum to ``k``) and ``P_e`` the mean softmax probability of ``e``, as
  Hugging Face's ``load_balancing_loss_func`` computes it for one layer
  (with ``token_mask`` as its ``attention_mask``: both means run over the
  real tokens only). A perfectly balanced router scores ``k``; only ``P``
  carries a gradient.

  Args:
    router_logits: ``(..., num_experts)`` logits, floating dtype.
    experts: ``(..., k)`` chosen expert indices (from :func:`top_k_routing`).
    num_experts: the number of experts ``E``.
    token_mask: ``(...)`` bool, ``True`` for a real token; ``None``: every
      token counts. With no real token the loss is 0.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if the logits' last axis is not ``num_experts``, the
      leading shapes differ or the mask has another shape.
    TypeError: for integer logits, non-integer ``experts`` or a mask that
      is not bool.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> logits = jnp.zeros((4, 8))
    >>> experts = jnp.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    >>> flaxact.load_balancing_loss(logits, experts, 8)
    Array(2., dtype=float32)
    >>> mask = jnp.array([True, True, False, False])
    >>> flaxact.load_balancing_loss(logits, experts, 8, token_mask=mask)
    Array(2., dtype=float32)

  References:
    Fedus et al., "Switch Transformers", 2021. https://arxiv.org/abs/2101.03961
  """
  logits = at_least_f32(as_float_array(router_logits, 'router_logits'))
  experts = check_experts(experts, num_experts)
  if logits.shape[-1] != num_experts or logits.shape[:-1] != experts.shape[:-1]:
    raise ValueError(
      f'load_balancing_loss: expected router_logits (..., {num_experts}) and'
      f' experts (..., k) with the same leading shape; got'
      f' {tuple(logits.shape)} and {tuple(experts.shape)}.'
    )
  m = _weights(
    token_mask, logits.shape[:-1], logits.dtype, 'load_balancing_loss'
  )
  logits = _clean(logits, m)
  probs = jax.nn.softmax(logits.reshape(-1, num_experts), axis=-1)
  flat = experts.reshape(probs.shape[0], experts.shape[-1])
  hits = jax.nn.one_hot(flat, num_experts, dtype=logits.dtype)
  if m is None:
    tokens = max(probs.shape[0], 1)  # no tokens: 0, not 0 / 0
    fraction = hits.sum((0, 1)) / tokens
    return num_experts * jnp.sum(fraction * probs.sum(0) / tokens)
  m = m.reshape(-1, 1)
  tokens = jnp.maximum(m.sum(), 1)  # no real token: 0, not 0 / 0
  fraction = (hits * m[..., None]).sum((0, 1)) / tokens
  probs = jnp.where(m > 0, probs, 0)  # padding's logits may be anything
  return num_experts * jnp.sum(fraction * probs.sum(0) / tokens)


def router_z_loss(
  router_logits: ArrayLike, *, token_mask: ArrayLike | None = None
) -> Array:
  r"""ST-MoE's router z-loss, ``mean(logsumexp(logits) ** 2)``.

  .. math::
    L_z = \frac{1}{T} \sum_t \Big(\log \sum_e e^{z_{te}}\Big)^2

  Args:
    router_logits: ``(..., num_experts)`` logits, floating dtype.
    token_mask: ``(...)`` bool, ``True`` for a real token; the mean runs over
      the real tokens (0 with none). ``None``: every token counts.

  Returns:
    A float32 scalar.

  Raises:
    TypeError: for integer logits or a mask that is not bool.
    ValueError: for a mask of another shape than the logits' leading axes.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.router_z_loss(jnp.zeros((3, 4)))  # log(4) ** 2
    Array(1.921812, dtype=float32)

  References:
    Zoph et al., "ST-MoE", 2022. https://arxiv.org/abs/2202.08906
  """
  logits = at_least_f32(as_float_array(router_logits, 'router_logits'))
  shape = logits.shape[:-1]
  m = _weights(token_mask, shape, logits.dtype, 'router_z_loss')
  z = jax.nn.logsumexp(_clean(logits, m), axis=-1) ** 2
  if m is None:
    return jnp.sum(z) / max(z.size, 1)  # no tokens: 0, not 0 / 0
  return jnp.sum(jnp.where(m > 0, z, 0)) / jnp.maximum(m.sum(), 1)


def sequence_balance_loss(
  router_logits: ArrayLike,
  experts: ArrayLike,
  num_experts: int,
  *,
  router: str = 'softmax',
  token_mask: ArrayLike | None = None,
) -> Array:
  r"""DeepSeek-V3's complementary sequence-wise balance loss (without alpha).

  For each sequence of ``T`` tokens, with ``k`` experts per token:

  .. math::
    L = \sum_{i=1}^{E} f_i P_i, \quad
    f_i = \frac{E}{k T} \sum_{t} \mathbb{1}[i \in \mathrm{experts}_t],
    \quad
    P_i = \frac{1}{T} \sum_t \frac{s_{i,t}}{\sum_j s_{j,t}}

  with ``s = softmax(logits)`` (``router='softmax'``) or
  ``s = sigmoid(logits)`` (``'sigmoid'``, DeepSeek-V3), then the mean over
  the sequences. A sequence whose experts are perfectly balanced scores 1
  (the ``f_i`` sum to ``E``); multiply by the paper's ``alpha`` (a small
  value such as 1e-4) yourself. Only ``P`` carries a gradient.

  With ``token_mask`` each sequence's ``T`` is its number of real tokens,
  masked tokens count in no sum, and the mean runs over the sequences that
  hold a real token (0 with none).

  Args:
    router_logits: ``(batch, seq, num_experts)`` logits, floating dtype.
    experts: ``(batch, seq, k)`` chosen expert indices.
    num_experts: the number of experts ``E``.
    router: ``'softmax'`` or ``'sigmoid'``: how scores come from logits.
    token_mask: ``(batch, seq)`` bool, ``True`` for a real token, or
      ``None``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: for logits that are not ``(batch, seq, num_experts)``,
      experts of another leading shape, an unknown router or a mask of
      another shape.
    TypeError: for integer logits, non-integer ``experts`` or a mask that
      is not bool.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> logits = jnp.zeros((2, 4, 4))  # 2 sequences of 4 tokens, 4 experts
    >>> experts = jnp.array([[[0], [1], [2], [3]], [[0], [0], [0], [0]]])
    >>> flaxact.sequence_balance_loss(logits, experts, 4)  # (1 + 1) / 2
    Array(1., dtype=float32)

  References:
    DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, eqs. 17-20.
    https://arxiv.org/abs/2412.19437
  """
  logits = at_least_f32(as_float_array(router_logits, 'router_logits'))
  experts = check_experts(experts, num_experts)
  e = num_experts
  if logits.ndim != 3 or logits.shape[-1] != e:
    raise ValueError(
      f'sequence_balance_loss: expected router_logits of shape (batch, seq,'
      f' {e}); got {tuple(logits.shape)}. For one sequence of shape'
      f' (seq, {e}) pass logits[None].'
    )
  if experts.ndim != 3 or experts.shape[:-1] != logits.shape[:-1]:
    raise ValueError(
      'sequence_balance_loss: expected experts of shape (batch, seq, k) with'
      f' the leading shape of router_logits {tuple(logits.shape[:-1])}; got'
      f' {tuple(experts.shape)}.'
    )
  router = normalise_choice(router, ROUTERS, 'router', 'routers')
  b, s, k = experts.shape
  m = _weights(token_mask, (b, s), logits.dtype, 'sequence_balance_loss')
  logits = _clean(logits, m)
  if m is None:
    m = jnp.ones((b, s), logits.dtype)
  if router == 'softmax':
    scores = jax.nn.softmax(logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits)
    scores = scores / scores.sum(-1, keepdims=True)
  tokens = m.sum(-1)  # (batch,) real tokens per sequence
  per = jnp.maximum(tokens, 1)[:, None]
  hits = jax.nn.one_hot(experts, e, dtype=logits.dtype).sum(-2)  # (b, s, E)
  f = e / k * (hits * m[..., None]).sum(1) / per
  p = jnp.where(m[..., None] > 0, scores, 0).sum(1) / per
  loss = (f * p).sum(-1)  # (batch,)
  used = tokens > 0
  return jnp.sum(jnp.where(used, loss, 0)) / jnp.maximum(used.sum(), 1)
