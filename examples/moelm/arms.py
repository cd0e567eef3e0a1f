"""The FFN arms of the mixture-of-experts comparison, and their sizes.

Every arm is a SwiGLU FFN (``silu(x G) * x U``, then ``D``) in each block of
``charlm``'s transformer; they differ in width and routing:

- ``dense``: one SwiGLU of the usual gated width ``h`` (``8d/3`` rounded up
  to a multiple of 8, as in ``glu_variants.py``);
- ``moe_softmax`` / ``moe_sigmoid``: ``E`` experts of width
  ``ceil(h / k)``, ``k`` per token, so a token meets as many FFN weights as
  in ``dense`` (**equal active parameters**, plus the router's ``d * E``);
  the softmax router (Mixtral) is balanced by the load-balancing loss, the
  sigmoid router (DeepSeek-V3) by moving its ``score_correction_bias``
  after every step, without an auxiliary loss;
- ``dense_total``: one SwiGLU of width ``E * ceil(h / k)``, as many FFN
  parameters as the MoE holds in all (**equal total parameters**), every
  one of them active;
- ``moe_unbalanced`` (not run by default): the softmax router with no
  balancing at all, to see what balancing prevents.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from _cli import UsageError, option
from charlm import model
from flax import nnx

from flaxact import nnx as fnnx


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Routing settings (each is a command-line flag)."""

  experts: int = option(8, 'experts per MoE layer (E)')
  top_k: int = option(2, 'experts per token (k)')
  aux_coef: float = option(
    0.01, 'weight of the load-balancing loss (moe_softmax; Switch: 0.01)'
  )
  bias_rate: float = option(
    1e-3,
    'step of the sigmoid router bias update per training step'
    ' (moe_sigmoid; DeepSeek-V3: 0.001)',
  )

  def check(self) -> None:
    """Raises ``UsageError`` unless ``1 <= top_k <= experts``."""
    if self.top_k > self.experts:
      raise UsageError(f'--top-k {self.top_k} exceeds --experts {self.experts}')


@dataclasses.dataclass(frozen=True)
class Arm:
  """One FFN arm: its table label, width and routing."""

  label: str
  width: str  # 'dense', 'expert' or 'total'
  router: str | None = None  # None: a dense FFN
  balance: str | None = None  # 'loss', 'bias' or None


ARMS = {
  'dense': Arm('dense SwiGLU', 'dense'),
  'moe_softmax': Arm('MoE softmax + LB loss', 'expert', 'softmax', 'loss'),
  'moe_sigmoid': Arm('MoE sigmoid + bias', 'expert', 'sigmoid', 'bias'),
  'dense_total': Arm('dense SwiGLU, MoE total', 'total'),
  'moe_unbalanced': Arm('MoE softmax, unbalanced', 'expert', 'softmax'),
}
DEFAULT_ARMS = ('dense', 'moe_softmax', 'moe_sigmoid', 'dense_total')


def parse_arms(text: str) -> list[str]:
  """The comma-separated arm names of ``--arms``, checked, in order."""
  names = [v.strip().lower() for v in text.split(',') if v.strip()]
  if not names:
    raise UsageError('--arms is empty')
  for name in names:
    if name not in ARMS:
      raise UsageError(f'unknown arm {name!r}; choose from {",".join(ARMS)}')
  return list(dict.fromkeys(names))


def widths(d_model: int, cfg: MoEConfig) -> dict[str, int]:
  """Hidden widths: ``dense``, ``expert`` (each expert's) and ``total``."""
  dense = model.hidden_features(d_model, True)
  expert = math.ceil(dense / cfg.top_k)
  return {'dense': dense, 'expert': expert, 'total': cfg.experts * expert}


def ffn_factory(arm: str, cfg: MoEConfig) -> model.FFNFactory:
  """Builds the FFN of ``arm`` for ``charlm.model.build_model(ffn=...)``.

  No biases; ``remat=False`` (small models: recomputation only costs time).
  """
  spec = ARMS[arm]

  def make(d_model: int, rngs: nnx.Rngs) -> nnx.Module:
    hidden = widths(d_model, cfg)[spec.width]
    if spec.router is None:
      return fnnx.GatedFFN(
        d_model,
        hidden,
        activation='silu',
        use_bias=False,
        remat=False,
        rngs=rngs,
      )
    return fnnx.MoE(
      d_model,
      hidden,
      cfg.experts,
      cfg.top_k,
      activation='silu',
      router=spec.router,
      normalize_weights=True,
      remat=False,
      rngs=rngs,
    )

  return make


def param_counts(lm: Any, arm: str, cfg: MoEConfig) -> dict[str, int]:
  """Total and active (per token) parameters of a model, and of one FFN.

  A token meets the router and ``k`` of the ``E`` experts of each MoE
  layer; everything else is active for every token.
  """
  total = model.count_params(nnx.state(lm, nnx.Param))
  ffn = lm.blocks[0].ffn
  ffn_total = model.count_params(nnx.state(ffn, nnx.Param))
  ffn_active = ffn_total
  if ARMS[arm].router is not None:
    experts = sum(
      model.count_params(nnx.state(p, nnx.Param))
      for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)
    )
    ffn_active = ffn_total - experts + experts * cfg.top_k // cfg.experts
  return {
    'total': total,
    'active': total - len(lm.blocks) * (ffn_total - ffn_active),
    'ffn_total_per_layer': ffn_total,
    'ffn_active_per_layer': ffn_active,
  }
