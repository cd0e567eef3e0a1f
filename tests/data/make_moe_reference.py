"""Writes ``moe_reference.npz``: real ``transformers`` sparse-MoE blocks.

The tests of the routed-FFN import (``tests/test_moe_torch_layouts.py``, and
later the ``MoE`` layers' ``from_torch`` tests) read this file with numpy only;
torch and ``transformers`` are needed only to regenerate it. Run it from the
repository root where both are installed::

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch transformers numpy
  /tmp/hfvenv/bin/python tests/data/make_moe_reference.py

Unlike ``make_torch_reference.py`` this script builds the ``transformers``
modules themselves (written for ``transformers`` 5, whose expert weights are
stacked 3-D tensors): ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock``, ``DeepseekV3MoE``, ``GptOssMLP`` and
``OlmoeSparseMoeBlock``, with small sizes (input 16, expert hidden 12, 8
experts), seeded random float32 weights and the ``eager`` experts
implementation. Only float32 is stored: every one of these routers computes
its logits or scores in float32 whatever the weights' dtype, so a float64
module would not be a float64 reference.

For each case ``NAME`` (see ``CASES``) the file holds:

- ``NAME.layout``: the ``layout=`` name; ``NAME.module``: the module class.
- ``NAME.config``: a JSON object of the config fields that matter to routing
  and sizes (``num_experts_per_tok``, ``norm_topk_prob``, ...), as the
  ``config=`` mapping a user would pass.
- ``NAME.stacked.KEY``: the module's own ``state_dict()`` (no prefix).
- ``NAME.per_expert.KEY``: the same weights under the per-expert keys of the
  published checkpoints, prefixed by ``NAME.prefix`` (Mixtral
  ``experts.{i}.w1/w2/w3.weight`` under ``model.layers.0.block_sparse_moe.``;
  the others ``experts.{i}.gate_proj/up_proj/down_proj.weight``, with
  ``.bias`` for GPT-OSS, under ``model.layers.0.mlp.``).
- ``NAME.x`` ``(2, 5, 16)`` and ``NAME.y``: the block's input and output;
  ``NAME.cotangent`` and ``NAME.dx``: the gradient of ``sum(y * cotangent)``
  with respect to ``x``; ``NAME.grad.KEY``: the same loss's gradient with
  respect to each trainable stacked weight.
- ``NAME.router_logits`` ``(10, 8)``, ``NAME.topk_weights`` and
  ``NAME.topk_experts`` ``(10, k)``: the router's outputs for the flattened
  tokens, in the order the router returns them (DeepSeek-V3's ``topk`` is
  unsorted: compare after sorting by expert index).

``versions`` holds the torch, ``transformers`` and numpy versions as JSON.
Every case is checked here for a margin of at least ``MIN_MARGIN`` between the
last chosen and the first unchosen expert's score (and group score), so that
float32 rounding cannot change which experts are chosen.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

D, HIDDEN, NUM_EXPERTS, TOKENS = 16, 12, 8, (2, 5)
MIN_MARGIN = 1e-3

# The config fields stored as NAME.config when the config has them.
CONFIG_FIELDS = (
  'hidden_size',
  'intermediate_size',
  'moe_intermediate_size',
  'shared_expert_intermediate_size',
  'n_shared_experts',
  'num_local_experts',
  'num_experts',
  'n_routed_experts',
  'num_experts_per_tok',
  'norm_topk_prob',
  'routed_scaling_factor',
  'n_group',
  'topk_group',
  'hidden_act',
  'swiglu_alpha',
  'swiglu_limit',
)

# name: (layout, module path, config class, config kwargs, seed)
CASES: dict[str, tuple[str, str, str, dict[str, Any], int]] = {
  'mixtral': (
    'mixtral',
    'mixtral.modeling_mixtral.MixtralSparseMoeBlock',
    'MixtralConfig',
    dict(intermediate_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2),
    0,
  ),
  'qwen2_moe': (
    'qwen2_moe',
    'qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock',
    'Qwen2MoeConfig',
    dict(
      moe_intermediate_size=HIDDEN,
      shared_expert_intermediate_size=20,
      num_experts=8,
      num_experts_per_tok=2,
      norm_topk_prob=False,
    ),
    1,
  ),
  'qwen3_moe': (
    'qwen3_moe',
    'qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock',
    'Qwen3MoeConfig',
    dict(
      moe_intermediate_size=HIDDEN,
      num_experts=8,
      num_experts_per_tok=2,
      norm_topk_prob=True,
    ),
    2,
  ),
  'deepseek_v3': (
    'deepseek_v3',
    'deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE',
    'DeepseekV3Config',
    dict(
      moe_intermediate_size=HIDDEN,
      n_routed_experts=8,
      num_experts_per_tok=3,
      n_group=4,
      topk_group=2,
      n_shared_experts=2,
      routed_scaling_factor=2.5,
      norm_topk_prob=True,
    ),
    3,
  ),
  'gpt_oss': (
    'gpt_oss',
    'gpt_oss.modeling_gpt_oss.GptOssMLP',
    'GptOssConfig',
    # A small limit so that the clamps act on these random weights.
    dict(
      intermediate_size=HIDDEN,
      num_local_experts=8,
      num_experts_per_tok=2,
      swiglu_alpha=1.702,
      swiglu_limit=1.5,
    ),
    4,
  ),
  'olmoe': (
    'olmoe',
    'olmoe.modeling_olmoe.OlmoeSparseMoeBlock',
    'OlmoeConfig',
    dict(
      intermediate_size=HIDDEN,
      num_experts=8,
      num_experts_per_tok=2,
      norm_topk_prob=False,
    ),
    5,
  ),
}


def _build(path: str, config_class: str, kwargs: dict[str, Any]):
  """Builds the module and its config (``transformers`` imported here)."""
  import importlib

  module_path, class_name = path.rsplit('.', 1)
  mod = importlib.import_module(f'transformers.models.{module_path}')
  cfg_mod = importlib.import_module(
    f'transformers.models.{module_path.split(".")[0]}'
  )
  config = getattr(cfg_mod, config_class)(
    hidden_size=D, experts_implementation='eager', **kwargs
  )
  return getattr(mod, class_name)(config).eval(), config


def _init_weights(module, seed: int) -> None:
  """Seeded normal weights (std 0.3; the router's 0.5, so logits spread)."""
  import torch

  gen = torch.Generator().manual_seed(1000 + seed)
  with torch.no_grad():
    for name, param in sorted(module.named_parameters()):
      router = name in ('gate.weight', 'router.weight')
      std = 0.5 if router else 0.3
      param.copy_(torch.randn(param.shape, generator=gen) * std)
    router = getattr(module, 'gate', None)
    if hasattr(router, 'e_score_correction_bias'):
      bias = router.e_score_correction_bias
      bias.copy_(torch.randn(bias.shape, generator=gen) * 0.2)


def _per_expert(layout: str, sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """The published checkpoints' per-expert keys for the same weights."""
  out: dict[str, np.ndarray] = {}
  gate_up, down = sd['experts.gate_up_proj'], sd['experts.down_proj']
  for key, value in sd.items():
    if not key.startswith('experts.'):
      out[key] = value
  for i in range(gate_up.shape[0]):
    e = f'experts.{i}.'
    if layout == 'gpt_oss':  # (E, in, 2h) interleaved; (E, h, out)
      bias = sd['experts.gate_up_proj_bias']
      out[e + 'gate_proj.weight'] = gate_up[i][:, ::2].T
      out[e + 'gate_proj.bias'] = bias[i, ::2]
      out[e + 'up_proj.weight'] = gate_up[i][:, 1::2].T
      out[e + 'up_proj.bias'] = bias[i, 1::2]
      out[e + 'down_proj.weight'] = down[i].T
      out[e + 'down_proj.bias'] = sd['experts.down_proj_bias'][i]
      continue
    hidden = gate_up.shape[1] // 2  # (E, 2h, in): gate rows, then up rows
    gate, up = gate_up[i, :hidden], gate_up[i, hidden:]
    if layout == 'mixtral':
      out[e + 'w1.weight'], out[e + 'w3.weight'] = gate, up
      out[e + 'w2.weight'] = down[i]
    else:
      out[e + 'gate_proj.weight'], out[e + 'up_proj.weight'] = gate, up
      out[e + 'down_proj.weight'] = down[i]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _margin(scores: np.ndarray, k: int) -> float:
  """The smallest gap between the k-th and (k+1)-th largest score."""
  top = -np.sort(-scores, axis=-1)
  return float(np.min(top[:, k - 1] - top[:, k]))


def _check_routing(name: str, block, config, x2d) -> None:
  """Checks margins, and that DeepSeek's bias and groups change the choice."""
  import torch

  router = block.router if name == 'gpt_oss' else block.gate
  k = config.num_experts_per_tok
  with torch.no_grad():
    logits = router(x2d)[0].double().numpy()
  if name != 'deepseek_v3':
    margin = _margin(logits, k)  # softmax is monotone in the logits
  else:
    s = 1 / (1 + np.exp(-logits))
    c = s + router.e_score_correction_bias.double().numpy()
    groups = c.reshape(len(c), config.n_group, -1).sum(-1)  # 2 per group
    margin = _margin(groups, config.topk_group)
    keep = np.argsort(-groups, axis=-1)[:, : config.topk_group]
    mask = np.zeros_like(groups, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    masked = np.where(np.repeat(mask, c.shape[1] // config.n_group, 1), c, -9)
    margin = min(margin, _margin(masked, k))
    chosen = np.sort(np.argsort(-masked, -1)[:, :k], -1)
    plain_s = np.sort(np.argsort(-s, -1)[:, :k], -1)
    plain_c = np.sort(np.argsort(-c, -1)[:, :k], -1)
    if (chosen == plain_c).all() or (plain_c == plain_s).all():
      raise RuntimeError(f'{name}: groups or bias do not change the choice.')
  if margin < MIN_MARGIN:
    raise RuntimeError(f'{name}: routing margin {margin:.2e}; change seed.')


def _check_clamps(block, x2d, limit: float) -> None:
  """Checks that GPT-OSS's three clamps each act on some element."""
  import torch

  ex = block.experts
  with torch.no_grad():
    h = torch.einsum('td,edf->etf', x2d, ex.gate_up_proj)
    h = (h + ex.gate_up_proj_bias[:, None]).numpy()
  gate, up = h[..., ::2], h[..., 1::2]
  if not ((gate > limit).any() and (up > limit).any() and (up < -limit).any()):
    raise RuntimeError('gpt_oss: a clamp never acts; lower swiglu_limit.')


def _case(name: str) -> dict[str, np.ndarray]:
  import torch

  layout, path, config_class, kwargs, seed = CASES[name]
  block, config = _build(path, config_class, kwargs)
  _init_weights(block, seed)
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn(*TOKENS, D, generator=gen)
  cotangent = torch.randn(*TOKENS, D, generator=gen)
  x2d = x.reshape(-1, D)
  _check_routing(name, block, config, x2d)
  if layout == 'gpt_oss':
    _check_clamps(block, x2d, config.swiglu_limit)

  x_var = x.clone().requires_grad_(True)
  y = block(x_var)
  y = y[0] if isinstance(y, tuple) else y  # GptOssMLP returns (y, scores)
  (y * cotangent).sum().backward()
  router = block.router if layout == 'gpt_oss' else block.gate
  with torch.no_grad():
    logits, weights, experts = router(x2d)

  def f32(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)

  sd = {k: f32(v) for k, v in block.state_dict().items()}
  prefix = 'model.layers.0.' + (
    'block_sparse_moe.' if layout == 'mixtral' else 'mlp.'
  )
  full = config.to_dict()
  fields = {f: full[f] for f in CONFIG_FIELDS if f in full}
  arrays = {
    f'{name}.layout': np.array(layout),
    f'{name}.module': np.array(type(block).__name__),
    f'{name}.config': np.array(json.dumps(fields, sort_keys=True)),
    f'{name}.prefix': np.array(prefix),
    f'{name}.x': f32(x),
    f'{name}.y': f32(y),
    f'{name}.cotangent': f32(cotangent),
    f'{name}.dx': f32(x_var.grad),
    f'{name}.router_logits': f32(logits),
    f'{name}.topk_weights': f32(weights),
    f'{name}.topk_experts': experts.numpy().astype(np.int32),
  }
  for key, value in sd.items():
    arrays[f'{name}.stacked.{key}'] = value
  for key, value in _per_expert(layout, sd).items():
    arrays[f'{name}.per_expert.{prefix}{key}'] = value
  for key, param in block.named_parameters():
    arrays[f'{name}.grad.{key}'] = f32(param.grad)
  return arrays


def main() -> None:
  """Builds every case and writes the ``.npz`` next to this script."""
  import torch
  import transformers

  torch.use_deterministic_algorithms(True)
  arrays: dict[str, np.ndarray] = {}
  for name in CASES:
    arrays.update(_case(name))
  arrays['versions'] = np.array(
    json.dumps(
      {
        'torch': torch.__version__,
        'transformers': transformers.__version__,
        'numpy': np.__version__,
      }
    )
  )
  path = pathlib.Path(__file__).with_name('moe_reference.npz')
  np.savez_compressed(path, **arrays)
  print(f'wrote {path} ({path.stat().st_size} bytes, {len(arrays)} arrays)')


if __name__ == '__main__':
  main()
