"""Shared pieces of the PyTorch-import tests: the stored reference, fake
tensors and small state dicts.

torch is not needed: the reference weights, inputs, outputs and input
gradients of real ``transformers`` modules come from
``tests/data/torch_reference.npz``, written by
``tests/data/make_torch_reference.py`` (see its docstring to regenerate it).
Torch tensors are stood in for by :class:`FakeTensor`.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from flaxact._src.interop.torch.ffn import TorchFFN
from tests.reference_npz import load_cases

_CASES, VERSIONS = load_cases(
  'torch_reference.npz', groups=('sd',), strings=('layout', 'activation')
)
#: FFN cases by name: ``sd``, ``x``, ``y``, ``ct``, ``gx``, ``layout``,
#: ``activation``; Hugging Face activation cases (stored as ``act_<name>``):
#: ``x``, ``y``, ``g``.
REFERENCE = {n: c for n, c in _CASES.items() if not n.startswith('act_')}
ACT_REFERENCE = {n[4:]: c for n, c in _CASES.items() if n.startswith('act_')}
CASE_NAMES = sorted(REFERENCE)


def kwargs(case: dict) -> dict:
  """The ``from_torch`` arguments of a reference case."""
  return dict(layout=case['layout'], activation=case['activation'] or None)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


# float64 numpy versions of the activations the layouts use.
NP_ACT = {
  'silu': lambda x: x / (1 + np.exp(-x)),
  'relu': lambda x: np.maximum(x, 0),
  'gelu': lambda x: 0.5 * x * special.erfc(-x / np.sqrt(2)),
  'gelu_tanh': _gelu_tanh,
  'gelu_new': _gelu_tanh,
  'gelu_pytorch_tanh': _gelu_tanh,
}


def numpy_forward(ffn: TorchFFN, x: np.ndarray) -> np.ndarray:
  """The FFN computed from the parsed weights in float64 numpy."""
  p = {
    k: {n: np.asarray(v, np.float64) for n, v in d.items()}
    for k, d in ffn.params().items()
  }

  def dense(name, h):
    y = h @ p[name]['kernel']
    return y + p[name]['bias'] if 'bias' in p[name] else y

  assert isinstance(ffn.activation, str)
  act = NP_ACT[ffn.activation]
  x = np.asarray(x, np.float64)
  if ffn.gated:
    h = act(dense('gate_proj', x)) * dense('up_proj', x)
  else:
    h = act(dense('up_proj', x))
  return dense('down_proj', h)


class FakeTensor:
  """Stands in for a ``torch.Tensor``: ``detach``, ``cpu``, ``numpy``."""

  def __init__(self, array, dtype: str = 'torch.float32'):
    self._array = np.asarray(array)
    self.dtype = dtype
    self.calls: list[str] = []

  def detach(self):
    self.calls.append('detach')
    return self

  def cpu(self):
    self.calls.append('cpu')
    return self

  def numpy(self):
    self.calls.append('numpy')
    if self.dtype in ('torch.bfloat16', 'torch.qint8'):  # as torch does
      raise TypeError(f'Got unsupported ScalarType {self.dtype}')
    return self._array

  def float(self):
    self.calls.append('float')
    return FakeTensor(self._array.astype(np.float32))


def llama_sd(d=4, h=6, dtype=np.float32, seed=0) -> dict[str, np.ndarray]:
  """A random ``llama``-layout state dict: input ``d``, hidden ``h``."""
  rng = np.random.default_rng(seed)
  return {
    'gate_proj.weight': rng.normal(size=(h, d)).astype(dtype),
    'up_proj.weight': rng.normal(size=(h, d)).astype(dtype),
    'down_proj.weight': rng.normal(size=(d, h)).astype(dtype),
  }


def in_a_model(sd: dict, layer: int = 0) -> dict:
  """``sd`` as it appears in a whole model's state dict, with neighbours."""
  rng = np.random.default_rng(1)
  full = {'model.embed_tokens.weight': rng.normal(size=(10, 4))}
  for i in range(12):
    full[f'model.layers.{i}.self_attn.q_proj.weight'] = rng.normal(size=(4, 4))
    other = llama_sd(seed=i + 10) if i != layer else sd
    for key, value in other.items():
      full[f'model.layers.{i}.mlp.{key}'] = value
  return full
