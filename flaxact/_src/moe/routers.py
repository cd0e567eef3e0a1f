"""Routers of mixture-of-experts FFNs and their auxiliary losses.

A router scores every token against every expert (``logits`` of shape
``(..., num_experts)``, computed in float32) and :func:`top_k_routing` picks
``k`` experts per token with a weight each, as the ``transformers`` modules of
Mixtral, Qwen-MoE, OLMoE, GPT-OSS (``router='softmax'``) and DeepSeek-V3
(``router='sigmoid'``, with ``score_correction_bias`` and group-limited
routing) do. Ties go to the lower expert index.

The auxiliary losses live in :mod:`flaxact._src.moe.losses`;
:func:`update_score_correction_bias` is DeepSeek-V3's auxiliary-loss-free
balancing step.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flaxact._src.common.checks import as_float_array, normalise_choice

Array = jax.Array

ROUTERS = ('sigmoid', 'softmax')


def at_least_f32(x: Array) -> Array:
  """``x`` in float32, or float64 where it already is."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_k(
  k: Any,
  num_experts: int,
  where: str = 'top_k_routing',
  name: str = 'experts_per_token (k)',
) -> int:
  """Returns ``k`` as ``int`` if ``1 <= k <= num_experts``, else raises.

  ``where`` and ``name`` word the message: the function and the name the
  caller knows ``k`` by (``from_torch`` names the config field).
  """
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise TypeError(
      f'{where}: {name} must be an integer in [1, {num_experts}]; got {k!r}'
      f' ({type(k).__name__}).'
    )
  if not 1 <= int(k) <= num_experts:
    raise ValueError(
      f'{where}: {name} must be an integer in [1, {num_experts}] (the number'
      f' of experts); got {k}.'
    )
  return int(k)


def check_groups(
  num_groups: Any,
  groups_per_token: Any,
  num_experts: int,
  k: int,
  *,
  where: str = 'top_k_routing',
  names: tuple[str, str] = ('num_groups', 'groups_per_token'),
) -> None:
  """Raises unless group-limited routing's settings fit the experts and k.

  ``names`` are what the caller calls the two settings (``from_torch``:
  the config fields ``n_group`` and ``topk_group``).
  """
  if num_groups is None and groups_per_token is None:
    return
  g, t = names
  size = 0
  if isinstance(num_groups, int) and num_groups > 0:
    size = num_experts // num_groups if num_experts % num_groups == 0 else 0
  problem = ''
  if num_groups is None or groups_per_token is None:
    problem = 'they go together'
  elif size < 2:
    problem = (
      f'{g} must split the {num_experts} experts into equal groups of at'
      f' least 2 (it must divide {num_experts}; a group scores the sum of its'
      ' two largest scores)'
    )
  elif not 1 <= groups_per_token <= num_groups or groups_per_token * size < k:
    problem = (
      f'{t} must be in [1, {g}] and its groups must hold the {k} experts per'
      ' token'
    )
  if problem:
    raise ValueError(
      f'{where}: {g} = {num_groups!r}, {t} = {groups_per_token!r}: {problem}.'
    )


def _group_mask(choice: Array, num_groups: int, groups_per_token: int):
  """True for the experts in each token's best ``groups_per_token`` groups."""
  e = choice.shape[-1]
  grouped = choice.reshape(*choice.shape[:-1], num_groups, e // num_groups)
  group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
  _, best = jax.lax.top_k(group_scores, groups_per_token)
  groups = jnp.arange(num_groups).reshape((1,) * best.ndim + (num_groups,))
  keep = jnp.any(best[..., :, None] == groups, axis=-2)
  return jnp.repeat(keep, e // num_groups, axis=-1)


def top_k_routing(
  logits: ArrayLike,
  k: int,
  *,
  router: str = 'softmax',
  normalize_weights: bool = True,
  score_correction_bias: ArrayLike | None = None,
  routed_scaling_factor: float = 1.0,
  num_groups: int | None = None,
  groups_per_token: int | None = None,
) -> tuple[Array, Array]:
  r"""Chooses ``k`` experts per token and their weights from router logits.

  ``router='softmax'`` (Mixtral, Qwen-MoE, OLMoE, GPT-OSS): ``p =
  softmax(logits)``; the ``k`` largest ``p`` are chosen and weighted by
  ``p``, renormalised to sum to one when ``normalize_weights``. GPT-OSS's
  softmax over the top-k logits is the renormalised form.

  ``router='sigmoid'`` (DeepSeek-V3): ``s = sigmoid(logits)``; experts are
  chosen by ``c = s + score_correction_bias``. With ``num_groups`` and
  ``groups_per_token`` the experts form equal groups, each scored by the sum
  of its two largest ``c``; only the best ``groups_per_token`` groups'
  experts may be chosen (excluded experts are never chosen, even where every
  kept ``c`` is negative). The weights are the chosen ``s`` (without the
  correction), divided by ``sum + 1e-20`` when ``normalize_weights``.

  Both multiply the weights by ``routed_scaling_factor``:

  .. math::
    w_i = \rho \, \frac{p_{e_i}}{\sum_{j \le k} p_{e_j}}

  Logits are cast to float32 first (float64 stays float64). Ties go to the
  lower expert index.

  Args:
    logits: router logits, shape ``(..., num_experts)``, floating dtype.
    k: experts per token, ``1 <= k <= num_experts``.
    router: ``'softmax'`` or ``'sigmoid'``.
    normalize_weights: renormalise the chosen weights to sum to one.
    score_correction_bias: ``(num_experts,)`` added to the sigmoid scores for
      the choice only (``'sigmoid'`` router); it receives no gradient.
    routed_scaling_factor: multiplies the weights (DeepSeek-V3: 2.5).
    num_groups: number of expert groups (``'sigmoid'`` group-limited
      routing; DeepSeek-V3's ``n_group``).
    groups_per_token: groups kept per token (``topk_group``).

  Returns:
    ``(weights, experts)``, both of shape ``(..., k)``: float32 weights and
    int32 expert indices, in order of decreasing choice score.

  Raises:
    ValueError: for ``k`` outside ``[1, num_experts]``, an unknown router,
      groups that do not divide the experts, or a bias of the wrong shape.
    TypeError: for integer logits or a non-integer ``k``.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> w, e = flaxact.top_k_routing(jnp.array([0.0, 2.0, 1.0]), 2)
    >>> e
    Array([1, 2], dtype=int32)
    >>> float(w.sum().round(6))
    1.0

  References:
    Fedus et al., "Switch Transformers", 2021; Jiang et al., "Mixtral of
    Experts", 2024; DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024.
  """
  logits = at_least_f32(as_float_array(logits, 'logits'))
  if logits.ndim < 1:
    raise ValueError('top_k_routing: logits must have shape (..., E).')
  num_experts = logits.shape[-1]
  k = check_k(k, num_experts)
  router = normalise_choice(router, ROUTERS, 'router', 'routers')
  check_groups(num_groups, groups_per_token, num_experts, k)
  if router == 'softmax':
    if score_correction_bias is not None or num_groups is not None:
      raise ValueError(
        'top_k_routing: score_correction_bias and num_groups need router='
        "'sigmoid'; got router='softmax'."
      )
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize_weights:
      weights = weights / weights.sum(-1, keepdims=True)
  else:
    scores = jax.nn.sigmoid(logits)
    choice = scores
    if score_correction_bias is not None:
      bias = as_float_array(score_correction_bias, 'score_correction_bias')
      if bias.shape != (num_experts,):
        raise ValueError(
          f'top_k_routing: score_correction_bias must have shape'
          f' ({num_experts},); got {tuple(bias.shape)}.'
        )
      bias = jax.lax.stop_gradient(bias.astype(scores.dtype))
      choice = scores + bias.reshape((1,) * (scores.ndim - 1) + bias.shape)
    choice = jax.lax.stop_gradient(choice)
    if num_groups is not None:
      keep = _group_mask(choice, num_groups, groups_per_token)  # pyright: ignore[reportArgumentType]
      choice = jnp.where(keep, choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if normalize_weights:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor, experts.astype(jnp.int32)


def check_experts(experts: Any, num_experts: int) -> Array:
  experts = jnp.asarray(experts)
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise TypeError(
      'experts must be integer expert indices of shape (..., k); got dtype'
      f' {np.dtype(experts.dtype).name}.'
    )
  return experts


def update_score_correction_bias(
  bias: ArrayLike, expert_load: ArrayLike, rate: float = 1e-3
) -> Array:
  r"""DeepSeek-V3's auxiliary-loss-free balancing step for the router bias.

  After each training step, every expert's ``score_correction_bias`` moves
  by a fixed ``rate`` towards equal load: down for experts that received
  more than the mean load, up for those below it (unchanged at the mean).

  .. math::
    b_e \leftarrow b_e - \gamma\,\mathrm{sign}(\mathrm{load}_e -
    \overline{\mathrm{load}})

  Args:
    bias: ``(num_experts,)`` the current ``score_correction_bias``.
    expert_load: ``(num_experts,)`` tokens routed to each expert in the step
      (the ``expert_load`` a MoE layer records), summed over the batch.
    rate: the bias update speed ``gamma`` (DeepSeek-V3: 0.001).

  Returns:
    The updated bias, the shape and dtype of ``bias``. No gradient flows.

  Raises:
    ValueError: if the shapes differ or ``rate`` is negative.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.update_score_correction_bias(
    ...     jnp.zeros(3), jnp.array([5, 3, 1]), rate=0.5)
    Array([-0.5,  0. ,  0.5], dtype=float32)

  References:
    Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts", 2024. https://arxiv.org/abs/2408.15664
  """
  bias = as_float_array(bias, 'bias')
  load = jnp.asarray(expert_load).astype(jnp.float32)
  if bias.shape != load.shape or bias.ndim != 1:
    raise ValueError(
      'update_score_correction_bias: bias and expert_load must both have'
      f' shape (num_experts,); got {tuple(bias.shape)} and'
      f' {tuple(load.shape)}.'
    )
  if rate < 0:
    raise ValueError(f'rate must be non-negative; got {rate}.')
  step = rate * jnp.sign(load - load.mean())
  return jax.lax.stop_gradient(bias - step.astype(bias.dtype))
