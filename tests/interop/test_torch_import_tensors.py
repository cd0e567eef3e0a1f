"""Torch tensors without torch: conversion, bfloat16, dtypes; and the proof
that flaxact never imports torch."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from flaxact._src.interop.torch.state_dict import parse_state_dict
from tests.torch_helpers import FakeTensor, llama_sd


def test_torch_like_tensors_are_converted_without_torch():
  sd = llama_sd()
  fakes = {k: FakeTensor(v) for k, v in sd.items()}
  ffn = parse_state_dict(fakes, layout='llama')
  for key, fake in fakes.items():
    assert fake.calls == ['detach', 'cpu', 'numpy'], key
  np.testing.assert_array_equal(ffn.kernels['up_proj'], sd['up_proj.weight'].T)


def test_bfloat16_tensors_stay_bfloat16():
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in llama_sd().items()}
  fakes = {
    k: FakeTensor(v.astype(np.float32), dtype='torch.bfloat16')
    for k, v in bf16.items()
  }
  ffn = parse_state_dict(fakes, layout='llama')
  assert ffn.param_dtype == jnp.bfloat16
  for name, kernel in ffn.kernels.items():
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, bf16[f'{name}.weight'].T)


def test_dtype_is_kept_or_cast():
  sd = llama_sd(dtype=np.float16)
  assert parse_state_dict(sd, layout='llama').param_dtype == np.float16
  ffn = parse_state_dict(sd, layout='llama', param_dtype=jnp.bfloat16)
  assert ffn.param_dtype == jnp.bfloat16
  assert all(k.dtype == jnp.bfloat16 for k in ffn.kernels.values())


def test_mixed_dtypes_promote():
  sd = llama_sd()
  sd['up_proj.weight'] = sd['up_proj.weight'].astype(jnp.bfloat16)
  assert parse_state_dict(sd, layout='llama').param_dtype == np.float32


def test_loading_never_imports_torch():
  """torch is blocked (sys.modules['torch'] = None): any import would fail.

  Dense and every MoE layout are loaded, Linen and NNX, and applied.
  """
  code = """
import sys
sys.modules['torch'] = None
sys.modules['transformers'] = None
import numpy as np
import jax.numpy as jnp
from flaxact import linen as fl, nnx as fx
from tests.torch_helpers import FakeTensor, REFERENCE
sd = {k: FakeTensor(v) for k, v in REFERENCE['starcoder2']['sd'].items()}
layer, variables = fl.from_torch(sd, layout='starcoder2')
layer.apply(variables, jnp.ones((2, 8)))
fx.from_torch(sd, layout='starcoder2')(jnp.ones((2, 8)))
from tests.moe_torch_helpers import LAYOUTS, REFERENCE as MOE
for name in LAYOUTS:
  moe = {k: FakeTensor(v) for k, v in MOE[name]['stacked'].items()}
  config = MOE[name]['config']
  layer, variables = fl.from_torch(moe, layout=name, config=config)
  fx.from_torch(moe, layout=name, config=config)
layer.apply(variables, jnp.ones((2, 16)))
print('ok')
"""
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


def test_layout_name_literals_list_every_layout():
  from typing import get_args

  from flaxact._src.interop.torch.layouts import (
    LAYOUTS,
    DenseLayoutName,
    MoELayoutName,
  )
  from flaxact._src.interop.torch.moe_layouts import MOE_LAYOUTS

  assert list(get_args(DenseLayoutName)) == list(LAYOUTS)
  assert list(get_args(MoELayoutName)) == list(MOE_LAYOUTS)
