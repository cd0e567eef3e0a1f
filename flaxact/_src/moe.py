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
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxact._src import grouped_matmul as gm
from flaxact._src import moe_core
from flaxact._src.checks import normalise_choice
from flaxact._src.expert_parallel import expert_parallel_ffn
from flaxact._src.gated_product import gated_product as _gated_product
from flaxact._src.moe_core import MOE_REMAT_POLICY as MOE_REMAT_POLICY
from flaxact._src.routing import (
  load_balancing_loss,
  router_z_loss,
  top_k_routing,
)

Array = jax.Array

#: Default rows per tile of the ``'loop'`` and ``'tiles'`` impls.
DEFAULT_TILE = 128


class MoEAux(NamedTuple):
  """Auxiliary outputs of :func:`moe_ffn` (leading token shape ``...``).

  Attributes:
    router_logits: ``(..., E)`` float32.
    weights: ``(..., k)`` float32 routing weights (before dropping).
    experts: ``(..., k)`` int32 chosen experts.
    dropped: ``(..., k)`` bool, assignments over capacity.
    expert_load: ``(E,)`` int32 tokens routed to each expert (before
      dropping).
    dropped_tokens: ``()`` int32 number of dropped assignments.
    load_balancing_loss: float32 scalar (on ``softmax(logits)``).
    router_z_loss: float32 scalar.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flaxact
    >>> E, d, h = 4, 8, 16
    >>> ks = jax.random.split(jax.random.key(0), 5)
    >>> x = jax.random.normal(ks[0], (6, d))
    >>> router = jax.random.normal(ks[1], (d, E))
    >>> gate, up = (jax.random.normal(k, (E, d, h)) for k in ks[2:4])
    >>> down = jax.random.normal(ks[4], (E, h, d))
    >>> moe = jax.jit(flaxact.moe_ffn, static_argnames='experts_per_token')
    >>> y, aux = moe(x, router, gate, up, down, experts_per_token=2)
    >>> aux.experts.shape, int(aux.expert_load.sum())
    ((6, 2), 12)
  """

  router_logits: Array
  weights: Array
  experts: Array
  dropped: Array
  expert_load: Array
  dropped_tokens: Array
  load_balancing_loss: Array
  router_z_loss: Array


def resolve_impl(impl: str) -> str:
  """``'auto'``: ``'loop'`` on CPU, ``'ragged'`` on GPU and TPU."""
  impl = normalise_choice(impl, (*gm.IMPLS, 'auto'), 'impl', 'impls')
  if impl == 'auto':
    return 'loop' if jax.default_backend() == 'cpu' else 'ragged'
  return impl


def capacity_of(capacity_factor, tokens: int, k: int, num_experts: int):
  """``ceil(capacity_factor * tokens * k / num_experts)``, or ``None``."""
  if capacity_factor is None:
    return None
  if isinstance(capacity_factor, bool) or not isinstance(
    capacity_factor, numbers.Real
  ):
    raise TypeError(
      f'capacity_factor must be a positive number or None; got'
      f' {capacity_factor!r}.'
    )
  capacity_factor = float(capacity_factor)
  if not capacity_factor > 0:
    raise ValueError(
      f'capacity_factor must be positive (or None for dropless); got'
      f' {capacity_factor}.'
    )
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


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


def moe_ffn(
  x: Any,
  router_kernel: Any,
  gate_kernel: Any,
  up_kernel: Any,
  down_kernel: Any,
  *,
  experts_per_token: int,
  router_bias: Any = None,
  gate_bias: Any = None,
  up_bias: Any = None,
  down_bias: Any = None,
  router: str = 'softmax',
  normalize_weights: bool = True,
  score_correction_bias: Any = None,
  routed_scaling_factor: float = 1.0,
  num_groups: int | None = None,
  groups_per_token: int | None = None,
  activation: str | Callable[[Array], Array] = 'silu',
  gated_product: Callable[[Array, Array], Array] | None = None,
  capacity_factor: float | None = None,
  impl: str = 'auto',
  tile_size: int = DEFAULT_TILE,
  precision: Any = None,
  dot_general: Callable[..., Array] | None = None,
  router_logits: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  expert_axis: str = 'expert',
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
  weights. The backward pass keeps two ``(rows, hidden)`` arrays, tagged
  ``'moe_gate'`` and ``'moe_up'``.

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
    capacity_factor: ``None`` (dropless) or a positive number.
    impl: ``'auto'`` (``'loop'`` on CPU, ``'ragged'`` on GPU/TPU), ``'loop'``,
      ``'tiles'`` or ``'ragged'``; all give the same result.
    tile_size: rows per tile of ``'loop'`` and ``'tiles'``.
    precision: matmul precision.
    dot_general: replaces :func:`jax.lax.dot_general` for the router.
    router_logits: ``(..., E)`` logits computed by the caller (the layers'
      ``router`` projection, which quantization libraries can intercept);
      when given, ``router_kernel`` only fixes the shapes and ``router_bias``
      and ``dot_general`` are unused.
    mesh: with a mesh, the experts run expert-parallel: kernels split along
      their experts axis over ``expert_axis``, tokens over every mesh axis,
      exchanged with ``all_to_all`` (see
      :func:`flaxact._src.expert_parallel.expert_parallel_ffn`). ``None``:
      one device (or whatever sharding ``jit`` propagates).
    expert_axis: the mesh axis of the experts.

  Returns:
    ``(y, aux)``: ``y`` of shape ``(..., d_out)`` in the dtype of ``x``, and
    the :class:`MoEAux`.

  Raises:
    ValueError: for ``k`` outside ``[1, E]``, an unknown router or impl,
      groups not dividing the experts, ``capacity_factor <= 0`` or
      mismatched shapes.
    TypeError: for integer input.

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
  """
  x = _as_input(x)
  kernels = tuple(jnp.asarray(a) for a in (gate_kernel, up_kernel, down_kernel))
  biases = tuple(
    None if b is None else jnp.asarray(b)
    for b in (gate_bias, up_bias, down_bias)
  )
  if router_logits is None:
    router_kernel = jnp.asarray(router_kernel)
  _check_shapes(x, router_kernel, kernels, biases)
  impl = resolve_impl(impl)
  lead, d = x.shape[:-1], x.shape[-1]
  tokens = x.reshape(-1, d)
  dot = jax.lax.dot_general if dot_general is None else dot_general
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  if router_logits is not None:
    logits = jnp.asarray(router_logits).reshape(tokens.shape[0], -1)
    logits = logits.astype(f32)
  else:
    logits = dot(
      tokens.astype(f32),
      router_kernel.astype(f32),
      (((1,), (0,)), ((), ())),
      precision=precision,
    )
    if router_bias is not None:
      logits = logits + jnp.asarray(router_bias).astype(f32)[None]
  e = logits.shape[-1]
  weights, experts = top_k_routing(
    logits,
    experts_per_token,
    router=router,
    normalize_weights=normalize_weights,
    score_correction_bias=score_correction_bias,
    routed_scaling_factor=routed_scaling_factor,
    num_groups=num_groups,
    groups_per_token=groups_per_token,
  )
  k = experts.shape[-1]
  capacity = capacity_of(capacity_factor, tokens.shape[0], k, e)
  tile = 1 if impl == 'ragged' else int(tile_size)
  if mesh is not None and capacity is not None:
    raise ValueError(
      'moe_ffn: capacity_factor with expert parallelism (mesh=...) is not'
      f' supported; got capacity_factor={capacity_factor}. Use the dropless'
      ' default (capacity_factor=None) with a mesh.'
    )
  if mesh is None:
    layout = moe_core.make_layout(experts, e, tile, capacity)
    dropped = layout.dropped
  else:
    layout, dropped = None, jnp.zeros(experts.shape, bool)
  kept_w = jnp.where(dropped, 0.0, weights)
  if gated_product is None:
    prod = functools.partial(_gated_product, activation=activation)
  else:
    prod = gated_product
  cast = lambda a: None if a is None else a.astype(x.dtype)
  kernels: Any = tuple(map(cast, kernels))
  biases: Any = tuple(map(cast, biases))
  if mesh is None:
    assert layout is not None
    y = moe_core.experts_ffn(
      tokens,
      kept_w,
      layout,
      kernels,
      biases,
      impl=impl,
      gated_product=prod,
      precision=precision,
    )
  else:
    y = expert_parallel_ffn(
      tokens,
      kept_w,
      experts,
      kernels,
      biases,
      mesh=mesh,
      expert_axis=expert_axis,
      impl=impl,
      gated_product=prod,
      precision=precision,
      tile_size=tile_size,
    )
  load = jax.nn.one_hot(experts, e, dtype=jnp.int32).sum((0, 1))
  aux = MoEAux(
    router_logits=logits.reshape(*lead, e),
    weights=weights.reshape(*lead, k),
    experts=experts.reshape(*lead, k),
    dropped=dropped.reshape(*lead, k),
    expert_load=load,
    dropped_tokens=dropped.sum().astype(jnp.int32),
    load_balancing_loss=load_balancing_loss(logits, experts, e),
    router_z_loss=router_z_loss(logits),
  )
  return y.reshape(*lead, -1), aux
