"""Runs code in a fresh Python process on simulated CPU devices.

JAX fixes the number of CPU devices when it starts, so a test that needs a
mesh runs its cases in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (added to any
``XLA_FLAGS`` already set), ``JAX_PLATFORMS=cpu``, warnings as errors and
this checkout first on ``PYTHONPATH`` (so the child imports this tree's
``flaxact`` and ``tests``, not another installed copy). The scripts it runs
check the device count with :func:`require_devices` and build their meshes
with :func:`auto_mesh`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).parent.parent
#: pytest in the child: one process, quiet.
PYTEST = ('-m', 'pytest', '-q', '-p', 'no:xdist', '-p', 'no:randomly')


def run_on_simulated_devices(
  *argv: str | os.PathLike, devices: int = 8, timeout: float = 600
) -> subprocess.CompletedProcess:
  """Runs ``python -W error *argv`` on ``devices`` simulated CPU devices.

  Args:
    *argv: the interpreter's arguments: a script and its arguments,
      ``'-c', code`` or ``*PYTEST, path``.
    devices: how many CPU devices the child's JAX sees.
    timeout: seconds before the child is killed (``TimeoutExpired``).

  Returns:
    The finished process, its stdout and stderr as text; the caller checks
    its return code.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  path = os.environ.get('PYTHONPATH')
  env = {
    **os.environ,
    'XLA_FLAGS': (
      f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
    ),
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': os.pathsep.join([str(ROOT), *([path] if path else [])]),
  }
  return subprocess.run(
    [sys.executable, '-W', 'error', *map(str, argv)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def json_report(*argv: str | os.PathLike, devices: int = 8) -> dict:
  """The JSON object a script prints on ``devices`` simulated devices.

  Fails with the end of the child's stderr if it exits with an error.
  """
  result = run_on_simulated_devices(*argv, devices=devices)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout)


def require_devices(count: int = 8) -> None:
  """Stops a case script (or its pytest session) unless JAX sees ``count``
  devices: it is meant to run through :func:`run_on_simulated_devices`."""
  got = jax.device_count()
  if got != count:
    raise SystemExit(
      f'needs {count} devices, got {got}: run it through'
      ' tests.multidevice.run_on_simulated_devices'
    )


def auto_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
  """``jax.make_mesh`` with every axis ``AxisType.Auto``."""
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(shape, names, axis_types=auto)
