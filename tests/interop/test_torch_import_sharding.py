"""Runs ``tests/torch_import_sharding_cases.py`` on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the cases run in one fresh
Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

CASES = pathlib.Path(__file__).parents[1] / 'torch_import_sharding_cases.py'


def test_from_torch_sharding_cases_on_8_simulated_cpu_devices():
  flags = os.environ.get('XLA_FLAGS', '')
  env = {
    **os.environ,
    'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count=8'.strip(),
    'JAX_PLATFORMS': 'cpu',
  }
  result = subprocess.run(
    [sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p',
     'no:randomly', str(CASES)],
    cwd=CASES.parent.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )  # fmt: skip
  report = result.stdout + result.stderr
  assert result.returncode == 0, report
  assert '4 passed' in report and 'skipped' not in report, report
