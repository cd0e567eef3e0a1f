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

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import stacked_cases

CASES = pathlib.Path(stacked_cases.__file__)


@pytest.fixture(scope='module')
def report() -> dict:
  flags = os.environ.get('XLA_FLAGS', '')
  env = {
    **os.environ,
    'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count=8'.strip(),
    'JAX_PLATFORMS': 'cpu',
  }
  result = subprocess.run(
    [sys.executable, str(CASES)],
    cwd=CASES.parent.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout)


def test_every_exported_rule_set_maps_layers():
  for name, rules in stacked_cases.rule_sets().items():
    assert 'layers' in dict(rules), name


def test_report_has_every_case(report):
  assert sorted(report) == sorted(stacked_cases.case_ids())


@pytest.mark.parametrize('case', stacked_cases.case_ids())
def test_stacked_case(report, case):
  result = report[case]
  assert 'error' not in result, result.get('error')
  assert result['devices'] == 8
  for name, spec in result['specs'].items():
    assert spec['want'][0] is None, (name, spec)  # 'layers' replicated
    assert spec['before'] == spec['want'], (name, spec)
    assert spec['after'] == spec['want'], (name, spec)
  # allclose ratio: max |got - want| / (atol + rtol |want|), see TOL there
  for name, ratio in result['ratio'].items():
    assert ratio <= 1.0, (name, ratio)
