"""MoE layers at scale on 8 simulated CPU devices (issue 19).

One subprocess (``tests/moe_ep_layer_cases.py``) runs every case; the tests
here check its report: NNX and Linen, one layer and a scanned stack, with
an ``ep_capacity_factor``, with ``capacity_factor`` under a mesh and with
tensor-parallel experts (``'mlp'`` on ``'model'``) equal the unsharded
layers in output and gradients, record their drops, gather no expert or
shared-expert kernel, and (NNX, one layer) export for TPU and CUDA.
"""

from __future__ import annotations

import functools
import pathlib

import pytest

from tests import moe_ep_layer_cases as cases
from tests.multidevice import json_report

NAMES = [
  f'{framework}_{config}_{stack}'
  for stack, configs in cases.STACK_CONFIGS.items()
  for config in configs
  for framework in ('nnx', 'linen')
]


@functools.cache
def _report(stack: str) -> dict:
  return json_report(pathlib.Path(cases.__file__), stack, timeout=1200)


@pytest.mark.parametrize('name', NAMES)
def test_layer_at_scale_equals_one_device(name):
  result = _report(name.split('_')[-1])[name]
  assert 'error' not in result, result['error']
  assert result['ratio']['output'] <= 1.0, result['ratio']
  assert result['ratio']['grads'] <= 1.0, result['ratio']
  assert result['kernel_gathers'] == [], result['kernel_gathers']
  if name.startswith('nnx_') and name.endswith('_layer'):
    assert result['exported'] == ['tpu', 'cuda']
  recorded = result['recorded']
  config = name.split('_')[1]
  if config == 'capacity':
    assert recorded['dropped_assignments']['sum'] > 0, recorded
  else:  # an ep_capacity_factor: its drops recorded, none at this load
    assert recorded['dropped_assignments']['sum'] == 0, recorded
    devices = 4 if config == 'tp' else 8  # the token shards
    assert recorded['dropped_per_device']['shape'][-1] == devices, recorded
  if config == 'tp':  # the experts' one reduction over 'model'
    assert result['all_reduces'] >= 1, result


def test_kernel_gathers_finds_a_gathered_kernel_shard():
  d, h = cases.D, cases.H
  line = f'  %g = f32[2,{d},{h // 2}]{{2,1,0}} all-gather(%k), dimensions={{0}}'
  assert cases.kernel_gathers(line)
  assert not cases.kernel_gathers(line.replace('all-gather', 'all-reduce'))
