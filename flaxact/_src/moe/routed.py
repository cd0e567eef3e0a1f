"""The experts stage of the routed FFN: routed tokens through the experts.

:func:`routed_experts` takes the tokens and their routing
(:class:`~flaxact._src.moe.routing_step.Routed`) and runs the weighted
expert FFNs one of three ways: ``'dense'`` (every expert on every token, or
on its capacity slots, through :mod:`~flaxact._src.moe.experts.dense`), a
grouped impl on one device (the sorted layout through
:mod:`~flaxact._src.moe.dispatch`), or expert-parallel over a mesh
(:mod:`~flaxact._src.moe.experts.parallel`). :func:`flaxact.moe_ffn` and
the ``MoE`` layers' shared body call it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import dense
from flaxact._src.moe.experts.parallel import expert_parallel_ffn
from flaxact._src.moe.routing_step import Routed

Array = jax.Array


def routed_experts(
  tokens: Array,
  r: Routed,
  kernels: Any,
  biases: Any,
  *,
  gated_product: Callable[[Array, Array], Array],
  impl: str,
  tile_size: int | None,
  precision: Any,
  dot_general: Callable[..., Array] | None,
  mesh: jax.sharding.Mesh | None,
  expert_axis: str,
  lean: bool = True,
  ep_capacity_factor: float | None = None,
  tensor_axis: str | None = None,
) -> tuple[Array, Routed]:
  """The weighted expert FFNs of ``(T, d)`` tokens routed as ``r``.

  ``kernels`` and ``biases`` are ``(gate, up, down)`` in the compute dtype;
  ``impl`` is resolved (not ``'auto'``) and ``lean`` says whether the
  grouped impls may run under their custom VJP (see
  :func:`flaxact._src.moe.experts.api.transform_impl`). Returns ``y`` and
  ``r`` with the expert-parallel exchange's drops added (under a mesh).
  """
  if not tokens.shape[0]:  # no tokens: no output rows, zero gradients
    return jnp.zeros((0, kernels[2].shape[-1]), tokens.dtype), r
  if impl == 'dense':
    gate, up, down = (
      functools.partial(
        dense.project,
        kernel=kernel,
        bias=bias,
        precision=precision,
        dot_general=dot_general,
      )
      for kernel, bias in zip(kernels, biases, strict=True)
    )
    return r.dense_ffn(tokens, (gate, up, down), gated_product), r
  if mesh is None:
    assert r.layout is not None
    y = dispatch.experts_ffn(
      tokens,
      r.kept_weights,
      r.layout,
      kernels,
      biases,
      impl=impl,
      gated_product=gated_product,
      precision=precision,
      lean=lean,
    )
    return y, r
  e = r.logits.shape[-1]
  out = expert_parallel_ffn(
    tokens,
    r.kept_weights,
    jnp.where(r.dropped, e, r.routed_experts),  # over capacity: nowhere
    kernels,
    biases,
    mesh=mesh,
    expert_axis=expert_axis,
    tensor_axis=tensor_axis,
    ep_capacity_factor=ep_capacity_factor,
    impl=impl,
    gated_product=gated_product,
    precision=precision,
    tile_size=tile_size,
    lean=lean,
  )
  r = r._replace(
    dropped=r.dropped | out.dropped, dropped_per_device=out.dropped_per_device
  )
  return out.y, r
