"""Checkpoint names of the FFN layers and their memory-lean remat policies.

The layers tag their intermediates with
:func:`jax.ad_checkpoint.checkpoint_name`, so a ``jax.checkpoint`` policy of
the user's (``jax.checkpoint_policies.save_only_these_names``,
``save_any_names_but_these``, offloading policies) can save, offload or
recompute them by name:

- ``'ffn_gate'``: the gate pre-activation ``gate_proj(x)``, shape
  ``(..., hidden_features)`` (gated layers only);
- ``'ffn_up'``: the up projection ``up_proj(x)``, ``(..., hidden_features)``;
- ``'ffn_hidden'``: the hidden activation that feeds ``down_proj``
  (``act(gate) * up``, or ``act(up)`` in ``FFN``), before dropout;
- ``'ffn_out'``: the layer output ``down_proj(...)``;
- ``'moe_gate'``, ``'moe_up'``: a ``MoE`` layer's expert gate and up
  pre-activations, ``(rows, hidden_features)``.
- ``'moe_routing'``: a ``MoE`` layer's routing results (router logits
  ``(T, E)``, top-k weights and experts, the sorted layout's integers).

Memory-lean backward. With ``remat=True`` (the default) the layer body runs
under a checkpoint (``nn.checkpoint`` in Linen, ``nnx.remat`` in NNX) with a
policy that saves only ``'ffn_gate'`` and ``'ffn_up'`` (only ``'ffn_up'`` for
``FFN``; ``'moe_gate'``, ``'moe_up'``, ``'moe_routing'`` and the shared
expert's two for ``MoE``): the backward pass keeps two hidden-sized arrays
per gated layer and recomputes the element-wise gated product, never a
matmul. Autodiff of a
hand-written gated FFN keeps six. Each layer class states the names it saves
(``remat_names``); :func:`save_only` is the one way to make the policy.

Examples:
  >>> from flaxact._src.layers import remat
  >>> remat.ALL_CHECKPOINT_NAMES
  ('ffn_gate', 'ffn_up', 'ffn_hidden', 'ffn_out', 'moe_gate', 'moe_up',
   'moe_routing')
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from flaxact._src.moe import dispatch

#: Checkpoint name of the gate pre-activation ``gate_proj(x)``.
GATE = 'ffn_gate'
#: Checkpoint name of the up projection ``up_proj(x)``.
UP = 'ffn_up'
#: Checkpoint name of the hidden activation fed to ``down_proj``.
HIDDEN = 'ffn_hidden'
#: Checkpoint name of the layer output.
OUT = 'ffn_out'
#: Every checkpoint name of the dense FFN layers (``FFN``, ``GatedFFN``).
CHECKPOINT_NAMES = (GATE, UP, HIDDEN, OUT)
#: Checkpoint name of a ``MoE`` layer's expert gate pre-activations.
MOE_GATE = dispatch.GATE
#: Checkpoint name of a ``MoE`` layer's expert up projections.
MOE_UP = dispatch.UP
#: Checkpoint name of a ``MoE`` layer's routing results (router logits,
#: top-k weights and experts, the sorted layout).
MOE_ROUTING = dispatch.ROUTING
#: Every checkpoint name a flaxact layer uses (the public
#: ``flaxact.linen.CHECKPOINT_NAMES`` and ``flaxact.nnx.CHECKPOINT_NAMES``).
ALL_CHECKPOINT_NAMES = (*CHECKPOINT_NAMES, MOE_GATE, MOE_UP, MOE_ROUTING)

#: What the gated layers save with ``remat=True``.
GATED_NAMES = (GATE, UP)
#: What ``FFN`` saves with ``remat=True``.
FFN_NAMES = (UP,)
#: What ``MoE`` saves with ``remat=True``: its experts' and its shared
#: expert's gate and up pre-activations, and the routing results (small:
#: ``(T, E)`` logits and integer layout arrays), so the backward pass does
#: not run the router and the sort again.
MOE_NAMES = (MOE_GATE, MOE_UP, MOE_ROUTING, GATE, UP)


@functools.cache
def save_only(names: tuple[str, ...]) -> Callable[..., Any]:
  """The ``jax.checkpoint`` policy that saves only ``names``."""
  return jax.checkpoint_policies.save_only_these_names(*names)
