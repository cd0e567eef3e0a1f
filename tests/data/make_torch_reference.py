"""Writes ``torch_reference.npz``: PyTorch FFN weights, inputs and outputs.

The tests of ``from_torch`` (``tests/test_torch_import.py``) load this file
with numpy only; torch is needed only to regenerate it. Run it where torch is
installed, from the repository root::

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python tests/data/make_torch_reference.py

The reference modules below are written out from the source models'
definitions (Hugging Face ``transformers``), so that the script needs nothing
but torch; each class says which model class it reproduces. Everything is
float32 with fixed seeds, and small (input size 8, hidden size 12 or 16).

The file holds, for each case ``NAME`` (see ``CASES``):

- ``NAME.sd.KEY``: the module's ``state_dict()[KEY]`` as float32 numpy.
- ``NAME.x``: an input of shape ``(2, 3, 8)``; ``NAME.y``: the module's output.
- ``NAME.layout`` and ``NAME.activation``: the ``from_torch`` arguments
  (activation ``''`` means the layout's default).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

D, HIDDEN = 8, 12


def gelu_new(x: torch.Tensor) -> torch.Tensor:
  """Hugging Face ``NewGELUActivation`` (``"gelu_new"``), the tanh form."""
  return (
    0.5
    * x
    * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  )


class LlamaMLP(nn.Module):
  """``LlamaMLP`` (also Mistral, Qwen2, Gemma with another activation).

  ``down_proj(act(gate_proj(x)) * up_proj(x))``; biases when
  ``config.mlp_bias``.
  """

  def __init__(self, act, bias: bool = False):
    super().__init__()
    self.gate_proj = nn.Linear(D, HIDDEN, bias=bias)
    self.up_proj = nn.Linear(D, HIDDEN, bias=bias)
    self.down_proj = nn.Linear(HIDDEN, D, bias=bias)
    self.act_fn = act

  def forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class T5DenseActDense(nn.Module):
  """T5 ``T5DenseActDense`` (v1.0 ``DenseReluDense``): ``wo(relu(wi(x)))``.

  Dropout between ``wi`` and ``wo`` is the identity in eval mode.
  """

  def __init__(self):
    super().__init__()
    self.wi = nn.Linear(D, HIDDEN, bias=False)
    self.wo = nn.Linear(HIDDEN, D, bias=False)

  def forward(self, x):
    return self.wo(F.relu(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
  """T5 v1.1 ``T5DenseGatedActDense``: ``wo(gelu_new(wi_0(x)) * wi_1(x))``."""

  def __init__(self):
    super().__init__()
    self.wi_0 = nn.Linear(D, HIDDEN, bias=False)
    self.wi_1 = nn.Linear(D, HIDDEN, bias=False)
    self.wo = nn.Linear(HIDDEN, D, bias=False)

  def forward(self, x):
    return self.wo(gelu_new(self.wi_0(x)) * self.wi_1(x))


class Conv1D(nn.Module):
  """Hugging Face ``Conv1D``: a linear layer whose weight is ``(in, out)``.

  ``forward`` is ``addmm(bias, x, weight)``, i.e. ``x @ weight + bias``.
  """

  def __init__(self, nf: int, nx: int):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
    self.bias = nn.Parameter(torch.randn(nf) * 0.1)

  def forward(self, x):
    return x @ self.weight + self.bias


class GPT2MLP(nn.Module):
  """``GPT2MLP``: ``c_proj(gelu_new(c_fc(x)))``; eval-mode dropout omitted."""

  def __init__(self):
    super().__init__()
    hidden = 16  # 4 * n_embd in GPT-2; any size works here
    self.c_fc = Conv1D(hidden, D)
    self.c_proj = Conv1D(D, hidden)

  def forward(self, x):
    return self.c_proj(gelu_new(self.c_fc(x)))


class Intermediate(nn.Module):
  """``BertIntermediate``: ``gelu(dense(x))``, exact (erf) GELU."""

  def __init__(self):
    super().__init__()
    self.dense = nn.Linear(D, HIDDEN)

  def forward(self, x):
    return F.gelu(self.dense(x))


class Output(nn.Module):
  """``BertOutput`` with its ``LayerNorm`` kept only for the state dict.

  BERT computes ``LayerNorm(dropout(dense(h)) + input)``; the residual sum
  and the LayerNorm are outside the FFN, so ``forward`` returns
  ``dense(h)``. The LayerNorm's keys stay in the state dict because
  ``from_torch(..., layout='bert')`` accepts and ignores them.
  """

  def __init__(self):
    super().__init__()
    self.dense = nn.Linear(HIDDEN, D)
    self.LayerNorm = nn.LayerNorm(D)

  def forward(self, h):
    return self.dense(h)


class BertFFN(nn.Module):
  """``BertIntermediate`` followed by ``BertOutput``'s dense layer."""

  def __init__(self):
    super().__init__()
    self.intermediate = Intermediate()
    self.output = Output()

  def forward(self, x):
    return self.output(self.intermediate(x))


class Phi3MLP(nn.Module):
  """``Phi3MLP``: one fused ``gate_up_proj`` (gate rows first, then up).

  ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``;
  ``down_proj(up * silu(gate))``.
  """

  def __init__(self):
    super().__init__()
    self.gate_up_proj = nn.Linear(D, 2 * HIDDEN, bias=False)
    self.down_proj = nn.Linear(HIDDEN, D, bias=False)

  def forward(self, x):
    up_states = self.gate_up_proj(x)
    gate, up_states = up_states.chunk(2, dim=-1)
    up_states = up_states * F.silu(gate)
    return self.down_proj(up_states)


def gelu_pytorch_tanh(x: torch.Tensor) -> torch.Tensor:
  """Hugging Face ``"gelu_pytorch_tanh"`` (Gemma's ``hidden_act``)."""
  return F.gelu(x, approximate='tanh')


# name: (layout, activation passed to from_torch or '', module factory)
CASES = {
  'llama': ('llama', '', lambda: LlamaMLP(F.silu)),
  'llama_bias': ('llama', '', lambda: LlamaMLP(F.silu, bias=True)),
  'gemma': (
    'llama',
    'gelu_pytorch_tanh',
    lambda: LlamaMLP(gelu_pytorch_tanh),
  ),
  't5': ('t5', '', T5DenseActDense),
  't5_gated': ('t5_gated', '', T5DenseGatedActDense),
  'gpt2': ('gpt2', '', GPT2MLP),
  'bert': ('bert', '', BertFFN),
  'phi3': ('phi3', '', Phi3MLP),
}


def main() -> None:
  arrays: dict[str, np.ndarray] = {}
  for seed, (name, (layout, activation, factory)) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    module = factory().eval()
    if isinstance(module, BertFFN):
      # Non-trivial LayerNorm weights, so that loading them by mistake shows.
      with torch.no_grad():
        module.output.LayerNorm.weight.normal_()
        module.output.LayerNorm.bias.normal_()
    x = torch.randn(2, 3, D) * 2.0
    with torch.no_grad():
      y = module(x)
    for key, value in module.state_dict().items():
      arrays[f'{name}.sd.{key}'] = value.numpy().astype(np.float32)
    arrays[f'{name}.x'] = x.numpy()
    arrays[f'{name}.y'] = y.numpy()
    arrays[f'{name}.layout'] = np.array(layout)
    arrays[f'{name}.activation'] = np.array(activation)
  arrays['torch_version'] = np.array(torch.__version__)
  path = pathlib.Path(__file__).with_name('torch_reference.npz')
  np.savez_compressed(path, **arrays)
  print(
    f'wrote {path} ({path.stat().st_size} bytes, torch {torch.__version__})'
  )


if __name__ == '__main__':
  main()
