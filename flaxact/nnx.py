"""Flax NNX layers: FFNs, gated FFNs, the routed MoE and activations.

``FFN`` and ``GatedFFN`` with the presets ``SwiGLU``, ``GeGLU`` and ``ReGLU``
(``silu``, the exact ``gelu``, ``relu``); ``MoE``, the routed FFN (mixture of
experts) with stacked expert kernels; the learnable activations ``PReLU``,
``Swish`` and ``XIELU``; ``from_torch``, which builds any of the FFN layers
from a PyTorch ``state_dict`` (dense and MoE layouts). Layers are called as
``layer(x)`` (``layer.eval()`` turns dropout off). The logical-axis rule sets
(``TENSOR_PARALLEL_RULES``, ``FSDP_RULES``, ``FSDP_TENSOR_PARALLEL_RULES``,
``EXPERT_PARALLEL_RULES``) map the layers' parameter axis names onto a device
mesh; ``CHECKPOINT_NAMES`` are the names remat policies can save.
"""

from flaxact._src.layers.remat import (
  ALL_CHECKPOINT_NAMES as CHECKPOINT_NAMES,
)
from flaxact._src.layers.sharding import (
  EXPERT_PARALLEL_RULES as EXPERT_PARALLEL_RULES,
)
from flaxact._src.layers.sharding import FSDP_RULES as FSDP_RULES
from flaxact._src.layers.sharding import (
  FSDP_TENSOR_PARALLEL_RULES as FSDP_TENSOR_PARALLEL_RULES,
)
from flaxact._src.layers.sharding import (
  TENSOR_PARALLEL_RULES as TENSOR_PARALLEL_RULES,
)
from flaxact._src.nnx.activations import PReLU as PReLU
from flaxact._src.nnx.activations import Swish as Swish
from flaxact._src.nnx.ffn import FFN as FFN
from flaxact._src.nnx.from_torch import from_torch as from_torch
from flaxact._src.nnx.gated import GatedFFN as GatedFFN
from flaxact._src.nnx.moe import MoE as MoE
from flaxact._src.nnx.presets import GeGLU as GeGLU
from flaxact._src.nnx.presets import ReGLU as ReGLU
from flaxact._src.nnx.presets import SwiGLU as SwiGLU
from flaxact._src.nnx.xielu import XIELU as XIELU

__all__ = [
  'CHECKPOINT_NAMES',
  'EXPERT_PARALLEL_RULES',
  'FFN',
  'FSDP_RULES',
  'FSDP_TENSOR_PARALLEL_RULES',
  'TENSOR_PARALLEL_RULES',
  'XIELU',
  'GatedFFN',
  'GeGLU',
  'MoE',
  'PReLU',
  'ReGLU',
  'SwiGLU',
  'Swish',
  'from_torch',
]
