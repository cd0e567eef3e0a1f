"""Mesh == one device for token counts that do not divide the mesh.

JAX fixes the device count when it starts, so the property
(``tests/properties/mesh_cases.py``) runs with pytest in one child process
on 8 simulated CPU devices, under the same Hypothesis profile. A failure
shows the child's report: the shrunk ``MoE(...)`` call included.
"""

from __future__ import annotations

import pathlib

from tests.multidevice import PYTEST, run_on_simulated_devices

CASES = pathlib.Path(__file__).with_name('mesh_cases.py')


def test_mesh_equals_one_device_on_8_simulated_devices():
  done = run_on_simulated_devices(
    *PYTEST, '-p', 'no:cacheprovider', '--hypothesis-show-statistics', CASES
  )
  assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
  print(done.stdout[-3000:])  # the child's Hypothesis statistics (-s)
