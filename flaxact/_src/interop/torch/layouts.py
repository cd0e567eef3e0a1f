"""The PyTorch FFN layouts ``from_torch`` reads: keys, orientation, activation.

This is the one table of layouts; the builders' docstrings and the README
refer to it (and a test checks the README's table against :data:`LAYOUTS`).
``torch.nn.Linear`` stores its weight ``(out, in)`` and is transposed to
Flax's ``(in, out)``; Hugging Face's GPT-2 ``Conv1D`` stores ``(in, out)``.

==============  ==========================================  ===============
layout          keys                                        activation
==============  ==========================================  ===============
``llama``       ``gate_proj.weight``, ``up_proj.weight``,   ``silu``
                ``down_proj.weight`` (``.bias`` on all
                three or none: ``LlamaConfig.mlp_bias``)
``mistral``,    the ``llama`` keys                          ``silu``
``qwen2``,
``qwen3``
``gemma``       the ``llama`` keys                          ``gelu_pytorch_``
                                                            ``tanh``
``t5``          ``wi.weight``, ``wo.weight``                ``relu``
``t5_gated``    ``wi_0.weight`` (gate), ``wi_1.weight``     ``gelu_tanh``
                (up), ``wo.weight``
``gpt2``        ``c_fc.weight``, ``c_fc.bias``,             ``gelu_tanh``
                ``c_proj.weight``, ``c_proj.bias``
                (``Conv1D``: ``(in, out)``)
``starcoder2``  the ``gpt2`` keys, ``nn.Linear`` weights    ``gelu_pytorch_``
                ``(out, in)``; ``.bias`` on both or none    ``tanh``
                (``Starcoder2Config.use_bias``)
``bert``        ``intermediate.dense.weight``/``bias``,     ``gelu`` (exact)
                ``output.dense.weight``/``bias``
``phi3``        ``gate_up_proj.weight`` (gate rows first,   ``silu``
                then up), ``down_proj.weight``
==============  ==========================================  ===============

Routed FFNs (mixture of experts) give an ``MoE``; their keys are read by
:mod:`flaxact._src.interop.torch.moe_layouts`, their routing settings by
:mod:`flaxact._src.interop.torch.moe_settings`. "experts" are either the
per-expert ``experts.{i}.gate_proj/up_proj/down_proj.weight`` of the published
checkpoints or the stacked ``experts.gate_up_proj`` ``(E, 2h, in)`` and
``experts.down_proj`` ``(E, out, h)`` of ``transformers`` 5 modules:

===============  ========================================  ===============
layout           keys                                      activation
===============  ========================================  ===============
``mixtral``      ``gate.weight``, experts (per expert      ``silu``
                 ``w1``/``w3``/``w2``: gate/up/down)
``qwen2_moe``    ``gate.weight``, experts,                 ``silu``
                 ``shared_expert.*``,
                 ``shared_expert_gate.weight``
``qwen3_moe``,   ``gate.weight``, experts                  ``silu``
``olmoe``
``deepseek_v3``  ``gate.weight``, experts,                 ``silu``
                 ``gate.e_score_correction_bias``,
                 ``shared_experts.*``
``gpt_oss``      ``router.weight``/``bias``, experts with  ``gpt_oss_glu``
                 biases (stacked ``(E, in, 2h)``, gate
                 and up in alternate columns)
===============  ========================================  ===============

The MoE activation is ``config.hidden_act`` where given (GPT-OSS's clamped
product takes ``swiglu_alpha``/``swiglu_limit`` instead).

A gated layout (``llama`` and its aliases, ``t5_gated``, ``phi3``) gives a
``GatedFFN``, the others an ``FFN``. The default activation is the one of the
model's published configuration; ``activation=`` overrides it (Gemma 2 and 3
also use ``gelu_pytorch_tanh``; a model trained with another ``hidden_act``
needs it passed). ``bert`` covers ``BertIntermediate`` and
``BertOutput.dense``; the ``output.LayerNorm.*`` keys after the residual are
accepted and not loaded.

Orientation is checked wherever shapes can tell: the projections must chain
(``up``'s output size is ``down``'s input size, the gate matches ``up``),
each bias must have its projection's output size, and an FFN's output size
must equal its input size for the transposed reading to be suggested. A
mismatch that the opposite orientation would fit says that the weights look
transposed and names the layout with that orientation (``gpt2`` versus
``starcoder2``). Where every matrix is square and no bias tells the hidden
size, shapes cannot tell: choose the layout by the source module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from flaxact._src.common.checks import normalise_choice

GATE, UP, DOWN = 'gate_proj', 'up_proj', 'down_proj'


@dataclasses.dataclass(frozen=True)
class Proj:
  """Where one projection of a layout lives in the state dict.

  Attributes:
    weight: the weight's key.
    bias: the bias's key, or None where the layout has no bias.
    linear: True for ``torch.nn.Linear`` weights, stored ``(out, in)``;
      False for ``Conv1D`` weights, stored ``(in, out)``.
  """

  weight: str
  bias: str | None = None
  linear: bool = True

  @property
  def stored_as(self) -> str:
    """How the weight is stored, for messages."""
    return (
      '(out, in) as torch.nn.Linear' if self.linear else '(in, out) as Conv1D'
    )


@dataclasses.dataclass(frozen=True)
class Layout:
  """A state-dict layout: its projections, bias rule and activation.

  Attributes:
    activation: the default activation name.
    projs: ``'gate_proj'`` (gated only), ``'up_proj'``, ``'down_proj'`` mapped
      to where they are stored (no ``'gate_proj'`` or ``'up_proj'`` when
      ``fused_gate_up`` holds both).
    bias: ``'required'`` (every bias key must be there), ``'optional'`` (all
      or none) or ``'none'`` (a bias key is unexpected).
    fused_gate_up: the key of a fused ``nn.Linear`` weight holding the gate
      rows, then the up rows; None if gate and up are separate.
    ignored: keys that sit next to the FFN in the source model and are
      accepted but not loaded.
  """

  activation: str
  projs: Mapping[str, Proj]
  bias: str = 'none'
  fused_gate_up: str | None = None
  ignored: tuple[str, ...] = ()

  @property
  def gated(self) -> bool:
    """Whether the layout has a gate projection."""
    return self.fused_gate_up is not None or GATE in self.projs

  @property
  def linear(self) -> bool:
    """Whether the weights are ``nn.Linear`` ``(out, in)`` matrices."""
    return all(p.linear for p in self.projs.values())

  def weight_keys(self) -> list[str]:
    """The weight keys, in reading order."""
    keys = [self.fused_gate_up] if self.fused_gate_up else []
    return keys + [p.weight for p in self.projs.values()]

  def bias_keys(self) -> list[str]:
    """The bias keys the layout can hold."""
    return [p.bias for p in self.projs.values() if p.bias is not None]

  def expected_keys(self, with_bias: bool) -> list[str]:
    """The keys read, with or without the biases."""
    return self.weight_keys() + (self.bias_keys() if with_bias else [])


def _llama(activation: str) -> Layout:
  return Layout(
    activation=activation,
    projs={
      GATE: Proj('gate_proj.weight', 'gate_proj.bias'),
      UP: Proj('up_proj.weight', 'up_proj.bias'),
      DOWN: Proj('down_proj.weight', 'down_proj.bias'),
    },
    bias='optional',
  )


def _gpt2_keys(*, linear: bool, bias: str, activation: str) -> Layout:
  return Layout(
    activation=activation,
    projs={
      UP: Proj('c_fc.weight', 'c_fc.bias', linear=linear),
      DOWN: Proj('c_proj.weight', 'c_proj.bias', linear=linear),
    },
    bias=bias,
  )


#: Every layout by name; see the module docstring for the table.
#: The names of the dense layouts (the keys of :data:`LAYOUTS`).
DenseLayoutName = Literal[
  'llama',
  'mistral',
  'qwen2',
  'qwen3',
  'gemma',
  't5',
  't5_gated',
  'gpt2',
  'starcoder2',
  'bert',
  'phi3',
]
#: The names of the routed-FFN (MoE) layouts.
MoELayoutName = Literal[
  'mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3', 'gpt_oss', 'olmoe'
]
#: Every layout name ``from_torch`` reads.
LayoutName = DenseLayoutName | MoELayoutName

LAYOUTS: Mapping[str, Layout] = {
  'llama': _llama('silu'),
  'mistral': _llama('silu'),
  'qwen2': _llama('silu'),
  'qwen3': _llama('silu'),
  'gemma': _llama('gelu_pytorch_tanh'),
  't5': Layout(
    activation='relu',
    projs={UP: Proj('wi.weight'), DOWN: Proj('wo.weight')},
  ),
  't5_gated': Layout(
    activation='gelu_tanh',
    projs={
      GATE: Proj('wi_0.weight'),
      UP: Proj('wi_1.weight'),
      DOWN: Proj('wo.weight'),
    },
  ),
  'gpt2': _gpt2_keys(linear=False, bias='required', activation='gelu_tanh'),
  'starcoder2': _gpt2_keys(
    linear=True, bias='optional', activation='gelu_pytorch_tanh'
  ),
  'bert': Layout(
    activation='gelu',
    projs={
      UP: Proj('intermediate.dense.weight', 'intermediate.dense.bias'),
      DOWN: Proj('output.dense.weight', 'output.dense.bias'),
    },
    bias='required',
    # BertOutput applies LayerNorm(dropout(dense(h)) + residual) after the
    # FFN; that LayerNorm is not part of the FFN and is not loaded.
    ignored=('output.LayerNorm.weight', 'output.LayerNorm.bias'),
  ),
  'phi3': Layout(
    activation='silu',
    projs={DOWN: Proj('down_proj.weight')},
    fused_gate_up='gate_up_proj.weight',
  ),
}


def resolve_layout(layout: Any) -> str:
  """Returns the normalised layout name, or raises ``ValueError``.

  Args:
    layout: a layout name; case and ``-`` versus ``_`` are ignored.

  Returns:
    A key of :data:`LAYOUTS`.

  Raises:
    ValueError: for a name that is not a layout (the closest one is named)
      or a value that is not a string.
  """
  if not isinstance(layout, str):
    raise ValueError(
      f'layout must be one of {", ".join(map(repr, LAYOUTS))}; got {layout!r}.'
    )
  return normalise_choice(layout, LAYOUTS, 'layout', 'layouts')


def same_keys_other_orientation(name: str) -> str | None:
  """The layout with ``name``'s keys and the opposite orientation, if any."""
  spec = LAYOUTS[name]
  for other, candidate in LAYOUTS.items():
    if (
      candidate.weight_keys() == spec.weight_keys()
      and candidate.linear != spec.linear
    ):
      return other
  return None
