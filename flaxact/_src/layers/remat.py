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
- ``'ffn_out'``: the layer output ``down_proj(...)``.

Memory-lean backward. With ``remat=True`` (the default) the layer body runs
under a checkpoint (``nn.checkpoint`` in Linen, ``nnx.remat`` in NNX) with a
policy that saves only ``'ffn_gate'`` and ``'ffn_up'`` (only ``'ffn_up'`` for
``FFN``): the backward pass keeps two hidden-sized arrays per gated layer and
recomputes the element-wise gated product, never a matmul. Autodiff of a
hand-written gated FFN keeps six.

Examples:
  >>> from flaxact._src.layers import remat
  >>> remat.CHECKPOINT_NAMES
  ('ffn_gate', 'ffn_up', 'ffn_hidden', 'ffn_out')
"""

from __future__ import annotations

import jax

#: Checkpoint name of the gate pre-activation ``gate_proj(x)``.
GATE = 'ffn_gate'
#: Checkpoint name of the up projection ``up_proj(x)``.
UP = 'ffn_up'
#: Checkpoint name of the hidden activation fed to ``down_proj``.
HIDDEN = 'ffn_hidden'
#: Checkpoint name of the layer output.
OUT = 'ffn_out'
#: Every checkpoint name the FFN layers use.
CHECKPOINT_NAMES = (GATE, UP, HIDDEN, OUT)

#: The checkpoint policy of the gated layers with ``remat=True``.
GATED_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(GATE, UP)
#: The checkpoint policy of ``FFN`` with ``remat=True``.
FFN_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(UP)
