"""The expert-parallel exchange on 8 simulated CPU devices (issue 19).

One subprocess (``tests/ep_exchange_cases.py``) runs every case; the tests
here check its report: the per-peer budget drops what a NumPy reference
drops, ``capacity_factor`` under a mesh drops and computes as one device,
the compiled all-to-all bytes with ``ep_capacity_factor=1.25`` stay within
1.3 times the routed bytes, and the ragged exchange exports for TPU and
CUDA.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.moe.experts.exchange import peer_budget
from tests import ep_exchange_cases as cases
from tests.multidevice import json_report

MESHES = tuple(cases.MESHES)


@functools.cache
def _report() -> dict:
  return json_report(pathlib.Path(cases.__file__))


def _result(name):
  result = _report()[name]
  assert not (isinstance(result, dict) and 'error' in result), result['error']
  return result


@pytest.mark.parametrize('mesh', MESHES)
def test_budget_drops_past_the_budget_in_token_order(mesh):
  assert _result(f'budget_{mesh}') == []


@pytest.mark.parametrize(
  ('mesh', 'impl'),
  [(m, i) for m, impls in cases.CAPACITY_IMPLS.items() for i in impls],
)
def test_capacity_factor_on_a_mesh_drops_as_one_device(mesh, impl):
  assert _result(f'capacity_{mesh}_{impl}') == []


def test_exchange_bytes_are_proportional_to_the_routed_tokens():
  mesh = cases.BYTES_MESH
  figures = _result(f'bytes_{mesh}')
  capped, dropless = figures['1.25'], figures['None']
  assert capped['fwd_ratio'] <= 1.3, capped
  assert capped['bwd_ratio'] <= 1.3, capped
  ep = 4 if mesh == 'data2_expert4' else 8
  # Dropless pads every peer's block to all of a device's assignments.
  assert dropless['fwd_ratio'] >= ep, dropless
  assert capped['fwd_temp_bytes'] < dropless['fwd_temp_bytes']
  assert capped['step_temp_bytes'] < dropless['step_temp_bytes']


def test_ragged_exchange_exports_and_runs_where_the_backend_has_it():
  result = _result('ragged')
  exported = result['exported']
  for platform in ('tpu', 'cuda'):
    assert exported[f'ragged_{platform}'] > 0, exported
    assert exported[f'padded_{platform}'] == 0, exported
  assert result['cpu'] in ('runs', 'UNIMPLEMENTED'), result['cpu']
  assert result.get('problems', []) == []


def test_all_to_all_bytes_reads_tuple_and_array_results():
  hlo = '\n'.join(
    [
      '  %a = (f32[1,5,16]{2,1,0}, s32[1,5]{1,0}) all-to-all(%x, %y), dims={0}',
      '  %b = bf16[4,8]{1,0} all-to-all(%z), dimensions={0}',
      '  %c = f32[4,8]{1,0} all-gather(%z), dimensions={0}',
    ]
  )
  assert cases.moe_ep.all_to_all_bytes(hlo) == 5 * 16 * 4 + 5 * 4 + 32 * 2


# ---------------------------------------------------------- one device


def _moe_args():
  ks = jax.random.split(jax.random.key(0), 5)
  return (
    jax.random.normal(ks[0], (6, 8)),
    jax.random.normal(ks[1], (8, 4)),
    jax.random.normal(ks[2], (4, 8, 16)),
    jax.random.normal(ks[3], (4, 8, 16)),
    jax.random.normal(ks[4], (4, 16, 8)),
  )


def test_peer_budget_is_the_ceiling_bounded_by_what_a_peer_can_receive():
  # tokens, k, experts per peer, peers
  assert peer_budget(1.25, 128, 2, 2, 4) == 80  # ceil(1.25 * 256 / 4)
  assert peer_budget(1.25, 3, 2, 2, 4) == 2  # ceil(1.875)
  assert peer_budget(None, 128, 2, 2, 4) == 256  # dropless: T * min(k, E/ep)
  assert peer_budget(None, 128, 4, 2, 8) == 256
  assert peer_budget(100.0, 128, 2, 2, 4) == 256  # never above that
  assert peer_budget(1e-9, 128, 2, 2, 4) == 1


@pytest.mark.parametrize(
  ('value', 'error'), [(0, ValueError), (-1.0, ValueError), ('1', TypeError)]
)
def test_ep_capacity_factor_is_validated_everywhere(value, error):
  with pytest.raises(error, match='moe_ffn: ep_capacity_factor'):
    flaxact.moe_ffn(*_moe_args(), experts_per_token=2, ep_capacity_factor=value)
  with pytest.raises(error, match='MoE: ep_capacity_factor'):
    fx.MoE(8, 16, 4, 2, ep_capacity_factor=value, rngs=nnx.Rngs(0))
  with pytest.raises(error, match='MoE: ep_capacity_factor'):
    fl.MoE(16, 4, 2, ep_capacity_factor=value).init(
      jax.random.key(0), _moe_args()[0]
    )


def test_ep_capacity_factor_does_nothing_without_a_mesh():
  want, _ = flaxact.moe_ffn(*_moe_args(), experts_per_token=2)
  got, aux = flaxact.moe_ffn(
    *_moe_args(), experts_per_token=2, ep_capacity_factor=0.1
  )
  np.testing.assert_array_equal(got, want)
  assert aux.dropped_per_device is None
  assert int(aux.dropped_tokens) == 0
