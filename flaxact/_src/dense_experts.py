"""The routed experts as plain ``dot_general`` calls: the ``'dense'`` impl.

Every token goes through every expert and the routing weights, scattered
into a ``(T, E)`` matrix that is zero where an expert was not chosen (or the
assignment was dropped), select and weight the results::

  gate = dot_general(x, G)            # (T, d) x (E, d, h) -> (T, E, h)
  up   = dot_general(x, U)            # (T, E, h)
  hid  = where(w > 0, prod(gate, up) * w, 0)
  out  = dot_general(hid, D)          # batched over E -> (E, T, out)
  y    = sum_E out

Each projection is one ``dot_general`` whose right operand is a whole
stacked ``(E, in, out)`` kernel, as in a hand-written MoE. Quantization
libraries see it as they see any dense layer's matmul: Qwix finds the
kernel among the module's parameters (PTQ stores it quantized, QAT
fake-quantizes it, LoRA adds a per-expert adapter ``(E, in, r)`` x
``(E, r, out)``) and quantizes per expert and output channel, and per token
row for the activations (its defaults: every non-contracting axis is a
channel); an AQT ``dot_general`` hook gets the same call. Plain autodiff
gives the backward pass, so a quantizer's own VJP (straight-through) holds.

It costs ``E / k`` times the FLOPs of the grouped impls; with remat the
backward pass keeps the two ``(T, E, h)`` pre-activations (tagged
``'moe_gate'`` and ``'moe_up'``). The ``MoE`` layers pick it by themselves
when a quantizer needs it (see :func:`flaxact._src.moe_layer.experts_impl`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxact._src.moe_core import GATE, UP

Array = jax.Array
#: ``project(x, bias_scale=None) -> y``: one expert projection (see
#: :func:`project`), bound to its kernel, bias and hook.
Projector = Callable[..., Array]


def combine_matrix(
  weights: Array, experts: Array, dropped: Array, num_experts: int
) -> Array:
  """The ``(T, E)`` routing weights: ``weights[t, j]`` at ``experts[t, j]``.

  Args:
    weights: ``(T, k)`` routing weights.
    experts: ``(T, k)`` chosen experts.
    dropped: ``(T, k)`` bool, assignments over capacity (weight 0).
    num_experts: ``E``.

  Returns:
    ``(T, E)`` in the dtype of ``weights``; zero where not chosen.
  """
  kept = jnp.where(dropped, 0.0, weights)
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=kept.dtype)
  # A sum of products, not an einsum: a quantizer intercepting matmuls must
  # not round the routing weights.
  return (one_hot * kept[..., None]).sum(1)


def project(
  x: Array,
  kernel: Any,
  bias: Any,
  *,
  precision: Any = None,
  dot_general: Callable[..., Array] | None = None,
  bias_scale: Array | None = None,
) -> Array:
  """Every expert's projection of ``x`` with one ``dot_general``.

  ``x`` of shape ``(T, d)`` with ``kernel`` ``(E, d, h)`` gives
  ``(T, E, h)`` (``bias`` ``(E, h)`` added); ``x`` of shape ``(T, E, h)``
  with ``kernel`` ``(E, h, out)`` contracts each expert's own rows and gives
  ``(E, T, out)`` (``bias`` ``(E, out)`` added times ``bias_scale``
  ``(E, T)``, the routing weights).

  Args:
    x: ``(T, d)`` tokens or ``(T, E, h)`` hidden activations, already
      promoted to the compute dtype.
    kernel: the stacked kernel (a quantization library may hand a quantized
      array through).
    bias: ``(E, out)`` or ``None``.
    precision: passed to ``dot_general``.
    dot_general: a :func:`jax.lax.dot_general` replacement; ``None`` looks
      up ``jax.lax.dot_general`` at call time (so Qwix sees the call).
    bias_scale: ``(E, T)`` weights of the bias of a batched projection.

  Returns:
    ``(T, E, h)`` or ``(E, T, out)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> project(jnp.ones((5, 4)), jnp.ones((3, 4, 8)), None).shape
    (5, 3, 8)
    >>> project(jnp.ones((5, 3, 8)), jnp.ones((3, 8, 4)), None).shape
    (3, 5, 4)
  """
  dot = jax.lax.dot_general if dot_general is None else dot_general
  if x.ndim == 2:
    y = dot(x, kernel, (((1,), (1,)), ((), ())), precision=precision)
    if bias is not None:
      y = y + jnp.asarray(bias).astype(y.dtype)[None]
    return y
  y = dot(x, kernel, (((2,), (1,)), ((1,), (0,))), precision=precision)
  if bias is not None:
    b = jnp.asarray(bias).astype(y.dtype)[:, None, :]
    scale = jnp.ones(y.shape[:2], y.dtype) if bias_scale is None else bias_scale
    y = y + scale.astype(y.dtype)[..., None] * b
  return y


def experts_ffn(
  x: Array,
  combine: Array,
  projections: tuple[Projector, Projector, Projector],
  gated_product: Callable[[Array, Array], Array],
) -> Array:
  """``sum_e combine[t, e] * FFN_e(x[t])`` with every expert on every token.

  Args:
    x: ``(T, d)`` tokens in the compute dtype.
    combine: ``(T, E)`` routing weights from :func:`combine_matrix`.
    projections: gate, up and down: each ``project(a, bias_scale=None)``
      (see :func:`project`).
    gated_product: ``(gate, up) -> hidden``, element-wise.

  Returns:
    ``(T, out)`` in the dtype of the projections.
  """
  gate, up, down = projections
  g = checkpoint_name(gate(x), GATE)
  u = checkpoint_name(up(x), UP)
  w = combine.astype(g.dtype)[..., None]
  # Unchosen experts are masked, not just weighted by zero: an overflow
  # there (inf * 0) must not reach y.
  hid = jnp.where(w != 0, gated_product(g, u) * w, 0).astype(g.dtype)
  out = down(hid, bias_scale=combine.T)
  return out.sum(0)
