"""Stacked layers on a mesh with every exported rule set (8 CPU devices).

``tests/stacked_cases.py`` runs every case in one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts) and prints a JSON report; each test here checks one
case of it: the ``PartitionSpec`` of every stacked parameter at creation and
after a training step is the one the contract's logical axes and the rule set
give (``'layers'`` replicated), and the sharded step's loss, output and
updated parameters equal the unsharded step's.
"""

from __future__ import annotations

import functools
import pathlib

from tests import stacked_cases
from tests.multidevice import json_report

CASES = pathlib.Path(stacked_cases.__file__)


@functools.cache
def _report() -> dict:
  return json_report(CASES)


def _problems(case: str, result: dict) -> list[str]:
  """What is wrong with one case of the report (nothing: an empty list)."""
  if 'error' in result:
    return [f'{case}: {result["error"]}']
  found = []
  if result['devices'] != 8:
    found.append(f'{case}: output on {result["devices"]} devices')
  for name, spec in result['specs'].items():
    if spec['want'][0] is not None:
      found.append(f"{case}: {name}: 'layers' not replicated: {spec}")
    if not spec['before'] == spec['after'] == spec['want']:
      found.append(f'{case}: {name}: {spec}')
  # allclose ratio: max |got - want| / (atol + rtol |want|), TOL there
  for name, ratio in result['ratio'].items():
    if not ratio <= 1.0:
      found.append(f'{case}: {name} differs from unsharded: ratio {ratio}')
  return found


def test_every_exported_rule_set_maps_layers_and_exp():
  # flax.nnx passes a logical name the rules do not map to the mesh as it is
  # (flax.core.spmd.apply_rules: rules.get(a, a)), so every rule set must map
  # the stacked-layer axis and the MoE experts axis.
  for name, rules in stacked_cases.rule_sets().items():
    assert 'layers' in dict(rules), name
    assert 'exp' in dict(rules), name


def test_stacked_layers_on_8_devices_with_every_rule_set():
  """One subprocess (also under xdist); every case checked separately."""
  report = _report()
  assert sorted(report) == sorted(stacked_cases.case_ids())
  problems = [
    problem
    for case in stacked_cases.case_ids()
    for problem in _problems(case, report[case])
  ]
  assert not problems, '\n'.join(problems)
