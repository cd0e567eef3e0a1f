"""Writes ``torch_reference.npz``: real ``transformers`` FFN modules' weights,
inputs, outputs and input gradients, and Hugging Face activations' values.

The tests of ``from_torch`` (``tests/test_torch_import_*.py``) and of the
Hugging Face activations load this file with numpy only; torch and
``transformers`` are needed only to regenerate it. Run it where both are
installed, from the repository root::

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 transformers==5.24.0 numpy
  /tmp/torchvenv/bin/python tests/data/make_torch_reference.py

Each FFN case instantiates the model's own MLP class from ``transformers``
with a tiny config (input size 8, hidden size 12 or 16), draws every
parameter from ``N(0, 0.3**2)`` with a fixed seed, and records, in float32:

- ``NAME.sd.KEY``: the module's ``state_dict()[KEY]``.
- ``NAME.x``: an input ``(2, 3, 8)``; ``NAME.y``: the module's output.
- ``NAME.ct``: a cotangent like ``y``; ``NAME.gx``: the gradient of
  ``sum(y * ct)`` with respect to ``x``.
- ``NAME.layout``, ``NAME.activation``: the ``from_torch`` arguments
  (activation ``''``: the layout's default).

Each activation case ``act_NAME`` holds ``x``, ``y = ACT2FN[NAME](x)`` and
``g``, the derivative at ``x``; ``act_xielu`` also holds the module's
``sd.*`` (its raw ``alpha_p``, ``alpha_n`` and its ``beta``, ``eps``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from torch import nn
from transformers import activations as hf_act
from transformers.models.bert import modeling_bert as bert
from transformers.models.gemma import modeling_gemma as gemma
from transformers.models.gpt2 import modeling_gpt2 as gpt2
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.phi3 import modeling_phi3 as phi3
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2
from transformers.models.t5 import modeling_t5 as t5

D, HIDDEN = 8, 12
# Configs check the attention sizes, which the MLPs do not use.
HEADS = dict(num_attention_heads=2, num_key_value_heads=2)


class BertFFN(nn.Module):
  """``BertIntermediate`` followed by ``BertOutput``'s dense layer.

  ``BertOutput`` computes ``LayerNorm(dropout(dense(h)) + input)``; the
  residual sum and the LayerNorm are outside the FFN, so ``forward`` returns
  ``output.dense(intermediate(x))``. The LayerNorm's keys stay in the state
  dict because ``from_torch(..., layout='bert')`` accepts and ignores them.
  """

  def __init__(self):
    super().__init__()
    config = transformers.BertConfig(
      hidden_size=D,
      intermediate_size=HIDDEN,
      hidden_act='gelu',
      num_attention_heads=2,
    )
    self.intermediate = bert.BertIntermediate(config)
    self.output = bert.BertOutput(config)

  def forward(self, x):
    return self.output.dense(self.intermediate(x))


def _llama_like(module, config_cls, **kw):
  return lambda: module(
    config_cls(hidden_size=D, intermediate_size=HIDDEN, **HEADS, **kw)
  )


def _t5(gated: bool):
  act = 'gelu_new' if gated else 'relu'
  config = transformers.T5Config(
    d_model=D,
    d_ff=HIDDEN,
    dense_act_fn=act,
    is_gated_act=gated,
    dropout_rate=0.0,
    num_heads=2,
  )
  cls = t5.T5DenseGatedActDense if gated else t5.T5DenseActDense
  return lambda: cls(config)


# name: (layout, activation passed to from_torch or '', module factory)
CASES = {
  'llama': ('llama', '', _llama_like(llama.LlamaMLP, transformers.LlamaConfig)),
  'llama_bias': (
    'llama',
    '',
    _llama_like(llama.LlamaMLP, transformers.LlamaConfig, mlp_bias=True),
  ),
  'llama_gelu_new': (
    'llama',
    'gelu_new',
    _llama_like(
      llama.LlamaMLP, transformers.LlamaConfig, hidden_act='gelu_new'
    ),
  ),
  'mistral': (
    'mistral',
    '',
    _llama_like(mistral.MistralMLP, transformers.MistralConfig),
  ),
  'qwen2': ('qwen2', '', _llama_like(qwen2.Qwen2MLP, transformers.Qwen2Config)),
  'qwen3': ('qwen3', '', _llama_like(qwen3.Qwen3MLP, transformers.Qwen3Config)),
  'gemma': ('gemma', '', _llama_like(gemma.GemmaMLP, transformers.GemmaConfig)),
  't5': ('t5', '', _t5(gated=False)),
  't5_gated': ('t5_gated', '', _t5(gated=True)),
  'gpt2': (
    'gpt2',
    '',
    lambda: gpt2.GPT2MLP(16, transformers.GPT2Config(n_embd=D, n_head=2)),
  ),
  'starcoder2': (
    'starcoder2',
    '',
    lambda: starcoder2.Starcoder2MLP(
      transformers.Starcoder2Config(
        hidden_size=D, intermediate_size=16, residual_dropout=0.0, **HEADS
      )
    ),
  ),
  'bert': ('bert', '', BertFFN),
  'phi3': ('phi3', '', _llama_like(phi3.Phi3MLP, transformers.Phi3Config)),
}

# Hugging Face ACT2FN names checked against flaxact, and their inputs.
ACTIVATIONS = ('gelu_10', 'sqrtsoftplus', 'laplace', 'gelu_python_tanh')


def _activation_inputs() -> torch.Tensor:
  dense = torch.linspace(-12.0, 12.0, 481)
  special = torch.tensor([-200.0, -80.0, -30.0, 0.0, 9.99, 10.0, 10.01, 40.0])
  return torch.cat([dense, special])


def _value_and_grad(fn, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
  x = x.clone().requires_grad_(True)
  y = fn(x)
  (g,) = torch.autograd.grad(y.sum(), x)
  return y.detach().numpy(), g.numpy()


def _ffn_cases(arrays: dict[str, np.ndarray]) -> None:
  for seed, (name, (layout, activation, factory)) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    module = factory().eval()
    with torch.no_grad():
      for p in module.parameters():
        p.normal_(0.0, 0.3)
    x = (torch.randn(2, 3, D) * 2.0).requires_grad_(True)
    y = module(x)
    ct = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * ct).sum(), x)
    for key, value in module.state_dict().items():
      arrays[f'{name}.sd.{key}'] = value.numpy().astype(np.float32)
    arrays[f'{name}.x'] = x.detach().numpy()
    arrays[f'{name}.y'] = y.detach().numpy()
    arrays[f'{name}.ct'] = ct.numpy()
    arrays[f'{name}.gx'] = gx.numpy()
    arrays[f'{name}.layout'] = np.array(layout)
    arrays[f'{name}.activation'] = np.array(activation)


def _activation_cases(arrays: dict[str, np.ndarray]) -> None:
  x = _activation_inputs()
  for name in ACTIVATIONS:
    y, g = _value_and_grad(hf_act.ACT2FN[name], x)
    arrays[f'act_{name}.x'] = x.numpy()
    arrays[f'act_{name}.y'] = y
    arrays[f'act_{name}.g'] = g
  # xIELU with parameters away from their initial values, in float32.
  torch.manual_seed(100)
  module = hf_act.XIELUActivation(
    alpha_p_init=1.3, alpha_n_init=0.9, beta=0.5, dtype=torch.float32
  )
  y, g = _value_and_grad(module, x)
  (gp, gn) = torch.autograd.grad(
    module(x).sum(), [module.alpha_p, module.alpha_n]
  )
  for key, value in module.state_dict().items():
    arrays[f'act_xielu.sd.{key}'] = value.numpy().astype(np.float32)
  arrays['act_xielu.x'] = x.numpy()
  arrays['act_xielu.y'] = y
  arrays['act_xielu.g'] = g
  arrays['act_xielu.g_alpha_p'] = gp.numpy()
  arrays['act_xielu.g_alpha_n'] = gn.numpy()


def main() -> None:
  arrays: dict[str, np.ndarray] = {}
  _ffn_cases(arrays)
  _activation_cases(arrays)
  arrays['torch_version'] = np.array(torch.__version__)
  arrays['transformers_version'] = np.array(transformers.__version__)
  path = pathlib.Path(__file__).with_name('torch_reference.npz')
  np.savez_compressed(path, **arrays)
  print(
    f'wrote {path} ({path.stat().st_size} bytes, torch {torch.__version__},'
    f' transformers {transformers.__version__})'
  )


if __name__ == '__main__':
  main()
