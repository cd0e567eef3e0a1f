"""MoE layers on 8 simulated CPU devices (``tests/moe_layer_cases.py``).

One subprocess (the device count is fixed when JAX starts) runs every case
and prints a JSON report; the tests here check it: with
``EXPERT_PARALLEL_RULES`` on a ``data=2, expert=4`` mesh every device holds
a quarter of each expert kernel's experts axis, the forward pass moves
tokens with all-to-all and gathers no expert kernel, and output and
gradients equal the single-device layer's; with ``'mlp'`` also on a
``'model'`` axis (mesh ``expert=4, model=2``) the experts' hidden axis is
split too and the numbers still agree. The ``'dense'`` impl (what
quantizers get) under the same rules keeps each device's experts in place
too: ``jit`` partitions its stacked-kernel matmuls, no kernel is gathered.
"""

from __future__ import annotations

import pathlib

from tests import moe_layer_cases
from tests.multidevice import json_report

CASES = pathlib.Path(moe_layer_cases.__file__)


def _report() -> dict:
  return json_report(CASES)


def _problems(case: str, result: dict, hidden_shard: int) -> list[str]:
  if 'error' in result:
    return [f'{case}: {result["error"]}']
  found = []
  e, d = moe_layer_cases.E, moe_layer_cases.D
  want = {
    'gate_proj': [e // 4, d, hidden_shard],
    'up_proj': [e // 4, d, hidden_shard],
    'down_proj': [e // 4, hidden_shard, d],
  }
  if result['shards'] != want:
    found.append(f'{case}: kernel shards {result["shards"]}, want {want}')
  for name, ratio in result['ratio'].items():
    if not ratio <= 1.0:
      found.append(f'{case}: {name} differs from one device: ratio {ratio}')
  collectives = result['collectives']
  if not case.endswith('_dense') and not collectives['counts'].get(
    'all-to-all'
  ):
    found.append(f'{case}: no all-to-all in the forward: {collectives}')
  if collectives['kernel_gathers']:
    found.append(f'{case}: an expert kernel is all-gathered: {collectives}')
  return found


# case: the per-device width of the experts' hidden axis ('mlp')
HIDDEN_SHARD = {
  'nnx_ep': moe_layer_cases.H,
  'linen_ep': moe_layer_cases.H,
  'nnx_ep_tp': moe_layer_cases.H // 2,
  'nnx_ep_dense': moe_layer_cases.H,
}


def test_moe_layers_on_8_devices():
  """One subprocess (one test item, also under xdist); every case checked."""
  report = _report()
  assert sorted(report) == sorted(HIDDEN_SHARD)
  problems = [
    problem
    for case, hidden_shard in HIDDEN_SHARD.items()
    for problem in _problems(case, report[case], hidden_shard)
  ]
  assert not problems, '\n'.join(problems)
