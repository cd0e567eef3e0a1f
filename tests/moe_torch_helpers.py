"""The stored ``transformers`` sparse-MoE blocks, for the ``from_torch`` tests.

``tests/data/moe_reference.npz`` (written by
``tests/data/make_moe_reference.py``, see its docstring) holds, per layout,
both key formats of one block's weights, its input, output, a cotangent with
the input and weight gradients it gives, and the router's outputs. This
module reads it with numpy only and turns the stored weight gradients into
flaxact's parameter tree with its own plain slicing (independent of the
reader under test).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.reference_npz import load_cases

LAYOUTS = (
  'mixtral',
  'qwen2_moe',
  'qwen3_moe',
  'deepseek_v3',
  'gpt_oss',
  'olmoe',
)
FORMATS = ('stacked', 'per_expert')


REFERENCE, _ = load_cases(
  'moe_reference.npz',
  groups=(*FORMATS, 'grad'),
  strings=('layout', 'module', 'prefix'),
  json_fields=('config',),
)


def state_dict(name: str, key_format: str) -> tuple[dict[str, Any], str]:
  """``(state_dict, prefix)`` of a stored case in one key format."""
  case = REFERENCE[name]
  prefix = case['prefix'] if key_format == 'per_expert' else ''
  return dict(case[key_format]), prefix


def _t(w: np.ndarray) -> np.ndarray:
  """A stacked ``(E, out, in)`` tensor (or an ``(out, in)`` one) as
  ``(..., in, out)``."""
  return np.swapaxes(w, -1, -2)


def reference_grads(name: str) -> dict[str, Any]:
  """The stored weight gradients, as flaxact's ``MoE`` parameter tree.

  ``transformers`` 5 stacks ``experts.gate_up_proj`` ``(E, 2h, d)`` (gate
  rows, then up rows) and ``experts.down_proj`` ``(E, out, h)``; GPT-OSS
  stores ``(E, d, 2h)`` with gate and up in alternate columns, and
  ``(E, h, out)``.
  """
  grad = REFERENCE[name]['grad']
  gpt_oss = name == 'gpt_oss'
  router = 'router' if gpt_oss else 'gate'
  tree: dict[str, Any] = {'router': {'kernel': _t(grad[f'{router}.weight'])}}
  gate_up = grad['experts.gate_up_proj']
  if gpt_oss:
    tree['router']['bias'] = grad['router.bias']
    bias = grad['experts.gate_up_proj_bias']
    tree['gate_proj'] = {'kernel': gate_up[..., ::2], 'bias': bias[:, ::2]}
    tree['up_proj'] = {'kernel': gate_up[..., 1::2], 'bias': bias[:, 1::2]}
    tree['down_proj'] = {
      'kernel': grad['experts.down_proj'],
      'bias': grad['experts.down_proj_bias'],
    }
    return tree
  h = gate_up.shape[1] // 2
  tree['gate_proj'] = {'kernel': _t(gate_up[:, :h])}
  tree['up_proj'] = {'kernel': _t(gate_up[:, h:])}
  tree['down_proj'] = {'kernel': _t(grad['experts.down_proj'])}
  for source in ('shared_expert', 'shared_experts'):
    if f'{source}.gate_proj.weight' in grad:
      tree['shared_expert'] = {
        proj: {'kernel': _t(grad[f'{source}.{proj}.weight'])}
        for proj in ('gate_proj', 'up_proj', 'down_proj')
      }
  if 'shared_expert_gate.weight' in grad:
    tree['shared_expert_gate'] = {
      'kernel': _t(grad['shared_expert_gate.weight'])
    }
  return tree
