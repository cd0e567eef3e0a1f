"""Runs ``tests/torch_import_sharding_cases.py`` on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the cases run in one fresh
Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import pathlib

from tests.multidevice import PYTEST, run_on_simulated_devices

CASES = pathlib.Path(__file__).parents[1] / 'torch_import_sharding_cases.py'


def test_from_torch_sharding_cases_on_8_simulated_cpu_devices():
  result = run_on_simulated_devices(*PYTEST, CASES)
  report = result.stdout + result.stderr
  assert result.returncode == 0, report
  assert '4 passed' in report and 'skipped' not in report, report
