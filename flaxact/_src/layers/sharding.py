"""Logical axis names of the FFN layers and rule sets that map them to a mesh.

The layers annotate every parameter with logical axis names (the MaxText /
T5X convention) and constrain their hidden activations to ``(..., 'mlp')``.
A rule set maps each logical name to a mesh axis (or ``None``: replicated);
activate one with ``flax.linen.logical_axis_rules`` (Linen) or
``flax.nnx.logical_axis_rules`` (NNX, the same context) together with
``jax.set_mesh(mesh)``. Outside such a context the annotations do nothing.

- ``gate_proj``, ``up_proj``: kernel ``('embed', 'mlp')``, bias ``('mlp',)``;
- ``gate_up_proj`` (fused): kernel ``('embed', None, 'mlp')``, bias
  ``(None, 'mlp')``;
- ``down_proj``: kernel ``('mlp', 'embed')``, bias ``('embed',)``.

Rule sets, for a mesh with axes ``'data'`` and ``'model'``:

- :data:`TENSOR_PARALLEL_RULES`: Megatron-style tensor parallelism. ``mlp``
  is split over ``'model'``, so ``gate_proj`` and ``up_proj`` are
  column-parallel and ``down_proj`` row-parallel: one all-reduce per FFN in
  the forward pass. ``batch`` over ``'data'``, ``embed`` replicated.
- :data:`FSDP_RULES`: fully sharded data parallelism (ZeRO-3). Parameters are
  split along ``embed`` over ``'data'`` and gathered before use; ``batch``
  over ``'data'``; ``mlp`` replicated.
- :data:`FSDP_TENSOR_PARALLEL_RULES`: both at once (2-D sharding): ``embed``
  and ``batch`` over ``'data'``, ``mlp`` over ``'model'``.

- :data:`EXPERT_PARALLEL_RULES`: for routed FFNs (``MoE``) on a mesh with
  axes ``'data'`` and ``'expert'``: the experts axis ``exp`` of the stacked
  expert kernels over ``'expert'`` (each device holds ``E / n`` experts and
  tokens travel to them with all-to-all), ``batch`` over ``'data'``.

``'batch'`` is not used by the layers themselves (they leave leading axes
unconstrained) but by the surrounding model's input constraints.

``'layers'`` is the leading axis of stacked layers, the name the README
recommends for ``nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})``
and ``nnx.vmap``/``nnx.scan`` with
``transform_metadata={nnx.PARTITION_NAME: 'layers'}``. Every rule set keeps
it replicated (``None``): each device holds its shard of every layer, and the
scan slices one layer at a time without communication. (Splitting it over a
mesh axis would be pipeline-style stage sharding, which a scan over the
stack does not do.)
"""

from __future__ import annotations

from typing import Any

import jax
from flax.core import spmd

Array = jax.Array

#: Logical name of the model width (the layer's input and output features).
EMBED = 'embed'
#: Logical name of the hidden width (``hidden_features``).
MLP = 'mlp'
#: Logical name of the batch axis of the surrounding model's activations.
BATCH = 'batch'
#: Logical name of the leading axis of stacked (scanned or vmapped) layers.
LAYERS = 'layers'
#: Logical name of the experts axis of a routed FFN's stacked kernels.
EXP = 'exp'

#: Kernel axes of ``gate_proj`` and ``up_proj``, stored ``(embed, mlp)``.
IN_KERNEL_AXES = (EMBED, MLP)
#: Bias axes of ``gate_proj`` and ``up_proj``.
IN_BIAS_AXES = (MLP,)
#: Kernel axes of the fused ``gate_up_proj``, stored ``(embed, 2, mlp)``.
FUSED_KERNEL_AXES = (EMBED, None, MLP)
#: Bias axes of the fused ``gate_up_proj``, ``(2, mlp)``.
FUSED_BIAS_AXES = (None, MLP)
#: Kernel axes of ``down_proj``, stored ``(mlp, embed)``.
OUT_KERNEL_AXES = (MLP, EMBED)
#: Bias axes of ``down_proj``.
OUT_BIAS_AXES = (EMBED,)

#: ``(kernel axes, bias axes)`` of ``gate_proj`` and ``up_proj``.
IN_PROJ_AXES = (IN_KERNEL_AXES, IN_BIAS_AXES)
#: ``(kernel axes, bias axes)`` of the fused ``gate_up_proj``.
FUSED_PROJ_AXES = (FUSED_KERNEL_AXES, FUSED_BIAS_AXES)
#: ``(kernel axes, bias axes)`` of ``down_proj``.
OUT_PROJ_AXES = (OUT_KERNEL_AXES, OUT_BIAS_AXES)

#: MoE expert kernels ``gate_proj``/``up_proj``: ``(exp, embed, mlp)``.
EXPERT_IN_PROJ_AXES = ((EXP, EMBED, MLP), (EXP, MLP))
#: MoE expert kernel ``down_proj``: ``(exp, mlp, embed)``.
EXPERT_OUT_PROJ_AXES = ((EXP, MLP, EMBED), (EXP, EMBED))
#: MoE router ``(embed, num_experts)``, bias ``(num_experts,)``.
ROUTER_PROJ_AXES = ((EMBED, None), (None,))

#: Tensor parallelism: ``mlp`` over ``'model'``, ``batch`` over ``'data'``.
TENSOR_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
  (BATCH, 'data'),
  (EMBED, None),
  (MLP, 'model'),
  (LAYERS, None),
  (EXP, None),
)
#: FSDP (ZeRO-3): parameters split along ``embed`` over ``'data'``.
FSDP_RULES: tuple[tuple[str, Any], ...] = (
  (BATCH, 'data'),
  (EMBED, 'data'),
  (MLP, None),
  (LAYERS, None),
  (EXP, None),
)
#: 2-D: FSDP along ``embed`` over ``'data'`` and ``mlp`` over ``'model'``.
FSDP_TENSOR_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
  (BATCH, 'data'),
  (EMBED, 'data'),
  (MLP, 'model'),
  (LAYERS, None),
  (EXP, None),
)
#: Expert parallelism (MoE): ``exp`` over ``'expert'``, ``batch`` over
#: ``'data'``; dense weights replicated. Combine with ``(MLP, 'model')`` on a
#: mesh that also has a ``'model'`` axis for tensor parallelism inside experts.
EXPERT_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
  (BATCH, 'data'),
  (EXP, 'expert'),
  (EMBED, None),
  (MLP, None),
  (LAYERS, None),
)


def hidden_shape_names(h: Array) -> tuple[Any, ...]:
  """The logical axis names of a hidden activation: ``(..., 'mlp')``.

  Leading axes are left unconstrained, so batch sharding propagates.
  """
  unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED
  return (unconstrained,) * (h.ndim - 1) + (MLP,)


def constrain_hidden(h: Array) -> Array:
  """Constrains a hidden-sized array to the logical axes ``(..., 'mlp')``.

  A no-op unless logical axis rules and a mesh (``jax.set_mesh``) are active.
  """
  rules = spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return h
  # The first rule naming 'mlp' wins; an unnamed axis is unsharded (as
  # flax.linen.with_logical_constraint's default fallback).
  mesh_axis = next((axis for name, axis in rules if name == MLP), None)
  names = hidden_shape_names(h)
  spec = jax.sharding.PartitionSpec(*names[:-1], mesh_axis)
  return jax.lax.with_sharding_constraint(h, spec)
