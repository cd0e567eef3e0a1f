"""Mixture-of-experts FFNs in the character-level LM of ``charlm``.

The core of ``moe_lm.py``, in two modules:

- ``moelm.arms``: the FFN arms under comparison (dense SwiGLU, MoE SwiGLU
  at equal active parameters with a softmax or a sigmoid router, dense
  SwiGLU with the MoE's total parameters), ``MoEConfig``, and parameter
  counts (active per token and total);
- ``moelm.train``: the jit-compiled step that adds the load-balancing loss
  or moves the sigmoid router's bias, records every step's expert load,
  and ``fit``.

The transformer, corpus, optimiser and validation loss are ``charlm``'s.
"""
