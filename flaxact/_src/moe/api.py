"""The routed FFN (mixture of experts) as one function of plain arrays.

:func:`moe_ffn` is the body the Linen and NNX ``MoE`` layers call: router,
top-k routing, the dispatch into groups sorted by expert, the gated expert
FFNs and the weighted combine, plus the auxiliary outputs a layer records.

Checkpoint names: the experts' gate and up pre-activations are tagged
``'moe_gate'`` and ``'moe_up'``; :data:`MOE_REMAT_POLICY`
(``jax.checkpoint_policies.save_only_these_names('moe_gate', 'moe_up')``)
saves just those.
The function's own backward pass already keeps only them (and ``x`` and the
integer routing metadata), so remat is needed only to drop the router's
small ``(T, E)`` intermediates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxact._src.activations.gated_product import (
  gated_product as _gated_product,
)
from flaxact._src.moe.dispatch import MOE_REMAT_POLICY as MOE_REMAT_POLICY
from flaxact._src.moe.experts.api import (
  Impl,
  resolve_impl,
  transform_impl,
)
from flaxact._src.moe.jitter import check_noise, jitter
from flaxact._src.moe.routed import routed_experts
from flaxact._src.moe.routing_step import MoEAux as MoEAux
from flaxact._src.moe.routing_step import route
from flaxact._src.moe.settings import Router, RoutingSettings
from flaxact._src.moe.token_mask import check_token_mask

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _check_shapes(x, router_kernel, kernels, biases):
  d = x.shape[-1]
  e = router_kernel.shape[-1]
  gate, up, down = kernels
  h = gate.shape[-1]
  want = {
    'router_kernel': ((d, e), router_kernel.shape),
    'gate_kernel': ((e, d, h), gate.shape),
    'up_kernel': ((e, d, h), up.shape),
    'down_kernel': ((e, h, down.shape[-1]), down.shape),
  }
  for name, b, shape in zip(
    ('gate_bias', 'up_bias', 'down_bias'),
    biases,
    ((e, h), (e, h), None),
    strict=True,
  ):
    if b is not None:
      want[name] = (shape or (e, down.shape[-1]), b.shape)
  for name, (expected, given) in want.items():
    if tuple(expected) != tuple(given):
      raise ValueError(
        f'moe_ffn: {name} must have shape {tuple(expected)} for x of width'
        f' {d} and {e} experts; got {tuple(given)}.'
      )


def _as_input(x):
  dtype = getattr(x, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    name = np.dtype(dtype).name if dtype is not None else type(x).__name__
    raise TypeError(
      'moe_ffn: expected a floating-point input x of shape (..., d)'
      f' (float32, bfloat16, float16 or float64); got {name}.'
    )
  if x.ndim < 1:
    raise ValueError('moe_ffn: x must have shape (..., d); got a scalar.')
  return jnp.asarray(x)


def expert_product(
  activation: str | Callable[[Array], Array],
  gated_product: Callable[[Array, Array], Array] | None,
) -> Callable[[Array, Array], Array]:
  """``gated_product``, or ``activation(gate) * up`` when it is ``None``."""
  if gated_product is None:
    return functools.partial(_gated_product, activation=activation)
  return gated_product


def moe_ffn(
  x: ArrayLike,
  router_kernel: ArrayLike | jax.ShapeDtypeStruct,
  gate_kernel: ArrayLike,
  up_kernel: ArrayLike,
  down_kernel: ArrayLike,
  *,
  experts_per_token: int,
  router_bias: ArrayLike | None = None,
  gate_bias: ArrayLike | None = None,
  up_bias: ArrayLike | None = None,
  down_bias: ArrayLike | None = None,
  router: Router | str = 'softmax',
  normalize_weights: bool = True,
  score_correction_bias: ArrayLike | None = None,
  routed_scaling_factor: float = 1.0,
  num_groups: int | None = None,
  groups_per_token: int | None = None,
  activation: str | Callable[[Array], Array] = 'silu',
  gated_product: Callable[[Array, Array], Array] | None = None,
  capacity_factor: float | None = None,
  ep_capacity_factor: float | None = None,
  impl: Impl | str = 'auto',
  tile_size: int | None = None,
  precision: Any = None,
  dot_general: Callable[..., Array] | None = None,
  router_logits: ArrayLike | None = None,
  mesh: jax.sharding.Mesh | None = None,
  expert_axis: str = 'expert',
  token_mask: ArrayLike | None = None,
  router_jitter_noise: float = 0.0,
  key: Array | None = None,
) -> tuple[Array, MoEAux]:
  r"""A routed (mixture-of-experts) gated FFN of plain arrays.

  .. math::
    y_t = \sum_{j \le k} w_{tj}\, \big(\mathrm{act}(x_t G_{e_{tj}}) \odot
    x_t U_{e_{tj}}\big) D_{e_{tj}}

  The router (``x @ router_kernel + router_bias``, float32) and
  :func:`top_k_routing` choose ``k`` experts per token; tokens are sorted
  by expert once and the expert FFNs run as grouped matmuls (``impl``).
  **Dropless by default**; ``capacity_factor=c`` keeps at most
  ``ceil(c * T * k / E)`` assignments per expert, dropping the overflow in
  token order (``aux.dropped``). Gradients reach the router through the
  weights.

  ``token_mask`` (``True`` = a real token) leaves padding out: masked tokens
  are routed to no expert (no expert computes for them, in every impl and
  under expert parallelism), their output is zero, and they count in no
  load, loss or drop. With ``capacity_factor`` the capacity stays
  ``ceil(c * T * k / E)`` with ``T`` every position (a static shape), and
  masked tokens take no slot: each expert keeps its first assignments of
  real tokens in token order. The backward pass keeps two
  ``(rows, hidden)`` arrays, tagged ``'moe_gate'`` and ``'moe_up'``.

  Args:
    x: tokens, ``(..., d)``, floating dtype; the experts compute in it.
    router_kernel: ``(d, E)``.
    gate_kernel: ``(E, d, h)``.
    up_kernel: ``(E, d, h)``.
    down_kernel: ``(E, h, d_out)``.
    experts_per_token: ``k``, in ``[1, E]``.
    router_bias: ``(E,)`` or ``None`` (GPT-OSS).
    gate_bias: ``(E, h)`` or ``None``; likewise ``up_bias``.
    up_bias: ``(E, h)`` or ``None``.
    down_bias: ``(E, d_out)`` or ``None``.
    router: ``'softmax'`` or ``'sigmoid'`` (see :func:`top_k_routing`, which
      also explains ``normalize_weights``, ``score_correction_bias``,
      ``routed_scaling_factor``, ``num_groups`` and ``groups_per_token``).
    normalize_weights: see :func:`top_k_routing`.
    score_correction_bias: see :func:`top_k_routing`.
    routed_scaling_factor: see :func:`top_k_routing`.
    num_groups: see :func:`top_k_routing`.
    groups_per_token: see :func:`top_k_routing`.
    activation: the gate's activation (name or callable) for
      ``activation(gate) * up``.
    gated_product: ``(gate, up) -> hidden`` replacing it (e.g.
      :func:`gpt_oss_glu`).
    capacity_factor: ``None`` (dropless) or a positive number; with a
      mesh the same drops as one device (global token order).
    ep_capacity_factor: with a mesh, each device sends at most
      ``ceil(ep_capacity_factor * T_local * k / ep)`` rows to each of the
      ``ep`` devices of ``expert_axis``, dropping the overflow in token
      order (``aux.dropped``, ``aux.dropped_per_device``). ``None``:
      dropless, at the cost of worst-case exchange buffers (``ep`` times
      the routed rows per device, in memory and, where the backend has no
      ``ragged_all_to_all`` (CPU), in bytes moved). Unused without a mesh.
    impl: ``'loop'``, ``'tiles'``, ``'ragged'`` or ``'tokamax'``
      (grouped matmuls; ``'tokamax'`` through ``tokamax.ragged_dot``, an
      optional dependency), or ``'dense'`` (every expert on every token, or
      on its capacity slots, one ``dot_general`` per projection, ``E / k``
      times the FLOPs dropless: what quantizers can reach); all give the
      same result. ``'auto'``: ``'dense'`` with a ``dot_general`` hook or
      while ``jax.lax.dot_general`` is intercepted (Qwix), else ``'loop'``
      on CPU and ``'tokamax'`` (when installed) or ``'ragged'`` on GPU/TPU
      (why: the Quantized experts and kernel backends page).
    tile_size: rows per tile of ``'loop'`` and ``'tiles'``; ``None`` picks
      it from the shape: for ``'loop'`` a power of two near half the mean
      rows per expert, ``T·k/E/2``, from 64 to 512; for ``'tiles'`` 128.
    precision: matmul precision.
    dot_general: replaces :func:`jax.lax.dot_general` in the router and the
      experts (``'dense'``; a grouped ``impl`` with it is an error).
    router_logits: ``(..., E)`` logits computed by the caller (the layers'
      ``router`` projection, which quantization libraries can intercept);
      when given, ``router_kernel`` only fixes the shapes and ``router_bias``
      and ``dot_general`` are unused.
    mesh: with a mesh, the grouped impls run expert-parallel: kernels split
      along their experts axis over ``expert_axis``, tokens over every mesh
      axis, exchanged with ``all_to_all``. ``None``:
      one device (or whatever sharding ``jit`` propagates; ``'dense'``
      always leaves the sharding to ``jit``).
    expert_axis: the mesh axis of the experts.
    token_mask: ``(...)`` bool, the token shape of ``x``; ``True`` for a
      real token. ``None``: every token is real.
    router_jitter_noise: ``eps`` in ``[0, 1)``: with ``key``, the router
      sees ``x * u``, ``u ~ U(1 - eps, 1 + eps)`` per element (the experts
      see ``x``), as in training. 0 (default): no noise.
    key: the PRNG key of the jitter noise; needed when
      ``router_jitter_noise > 0`` (for inference pass
      ``router_jitter_noise=0.0``).

  Returns:
    ``(y, aux)``: ``y`` of shape ``(..., d_out)`` in the dtype of ``x``, and
    the :class:`MoEAux`.

  Raises:
    ValueError: for ``k`` outside ``[1, E]``, an unknown router or impl,
      groups not dividing the experts, ``capacity_factor <= 0`` (or
      ``ep_capacity_factor <= 0``), an indivisible expert-parallel split,
      mismatched shapes (a ``token_mask`` not of shape ``x.shape[:-1]``),
      ``router_jitter_noise`` outside ``[0, 1)`` or without ``key`` (or
      with ``router_logits``).
    TypeError: for integer input, a ``token_mask`` that is not bool, or an
      ``ep_capacity_factor`` that is not a number.
    ImportError: ``impl='tokamax'`` without the ``tokamax`` package.

  Examples:
    >>> import jax, jax.numpy as jnp, flaxact
    >>> ks = jax.random.split(jax.random.key(0), 4)
    >>> x = jax.random.normal(ks[0], (6, 8))
    >>> moe = jax.jit(flaxact.moe_ffn, static_argnames='experts_per_token')
    >>> y, aux = moe(
    ...     x, jax.random.normal(ks[1], (8, 4)),
    ...     jax.random.normal(ks[2], (4, 8, 16)),
    ...     jax.random.normal(ks[3], (4, 8, 16)),
    ...     jax.random.normal(ks[3], (4, 16, 8)), experts_per_token=2)
    >>> y.shape, aux.expert_load.sum()
    ((6, 8), Array(12, dtype=int32))

    Padding left out with a token mask (its output is zero):

    >>> mask = jnp.array([True, True, True, True, False, False])
    >>> y, aux = moe(x, jax.random.normal(ks[1], (8, 4)),
    ...     jax.random.normal(ks[2], (4, 8, 16)),
    ...     jax.random.normal(ks[3], (4, 8, 16)),
    ...     jax.random.normal(ks[3], (4, 16, 8)), experts_per_token=2,
    ...     token_mask=mask)
    >>> aux.expert_load.sum(), float(jnp.abs(y[4:]).max())
    (Array(8, dtype=int32), 0.0)
  """
  settings = RoutingSettings(
    experts_per_token=experts_per_token,
    router=router,
    normalize_weights=normalize_weights,
    routed_scaling_factor=routed_scaling_factor,
    num_groups=num_groups,
    groups_per_token=groups_per_token,
    capacity_factor=capacity_factor,
    ep_capacity_factor=ep_capacity_factor,
    impl=impl,
    tile_size=tile_size,
  )
  settings.check_ep_capacity()
  x = _as_input(x)
  kernels = tuple(jnp.asarray(a) for a in (gate_kernel, up_kernel, down_kernel))
  biases = tuple(
    None if b is None else jnp.asarray(b)
    for b in (gate_bias, up_bias, down_bias)
  )
  if router_logits is None:
    router_kernel = jnp.asarray(router_kernel)
  _check_shapes(x, router_kernel, kernels, biases)
  resolved, lean = transform_impl(
    resolve_impl(impl, hooked=dot_general is not None),
    x,
    router_kernel,
    router_bias,
    router_logits,
    kernels,
    biases,
    score_correction_bias,
  )
  lead = x.shape[:-1]
  mask = check_token_mask(token_mask, lead, 'moe_ffn')
  eps = check_noise(router_jitter_noise, key, router_logits)
  tokens = x.reshape(-1, x.shape[-1])
  if router_logits is None:
    router_in = tokens if key is None or not eps else jitter(tokens, key, eps)
    logits = _router_logits(
      router_in, router_kernel, router_bias, precision, dot_general
    )
  else:
    e = jnp.shape(router_kernel)[-1]
    logits = jnp.asarray(router_logits).reshape(tokens.shape[0], e)
    logits = logits.astype(jnp.promote_types(x.dtype, jnp.float32))
  r = route(
    logits,
    settings,
    score_correction_bias=score_correction_bias,
    impl=resolved,
    mesh=None if resolved == 'dense' else mesh,
    token_mask=None if mask is None else mask.reshape(-1),
  )
  cast = lambda a: None if a is None else a.astype(x.dtype)
  y, r = routed_experts(
    tokens,
    r,
    tuple(map(cast, kernels)),
    tuple(map(cast, biases)),
    gated_product=expert_product(activation, gated_product),
    impl=resolved,
    tile_size=tile_size,
    precision=precision,
    dot_general=dot_general,
    mesh=mesh,
    expert_axis=expert_axis,
    lean=lean,
    ep_capacity_factor=ep_capacity_factor,
  )
  return y.reshape(*lead, y.shape[-1]), r.aux(lead)


def _router_logits(tokens, kernel, bias, precision, dot_general) -> Array:
  """``tokens @ kernel + bias`` in (at least) float32."""
  f32 = jnp.promote_types(tokens.dtype, jnp.float32)
  dot = jax.lax.dot_general if dot_general is None else dot_general
  logits = dot(
    tokens.astype(f32),
    kernel.astype(f32),
    (((1,), (0,)), ((), ())),
    precision=precision,
  )
  if bias is not None:
    logits = logits + jnp.asarray(bias).astype(f32)[None]
  return logits
