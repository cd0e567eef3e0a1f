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

import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

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


def json_report(
  *argv: str | os.PathLike, devices: int = 8, timeout: float = 600
) -> dict:
  """The JSON object a script prints on ``devices`` simulated devices.

  Computed once per test run: under pytest-xdist the first worker to ask
  runs the script under a file lock and leaves the report in a file keyed
  by the run's id and the arguments; the other workers wait for the lock
  and read it (a report runs a multi-device child that keeps both cores
  busy, so running it once per worker would double its cost). Fails with
  the end of the child's stderr if it exits with an error (nothing is
  left, so another worker asking runs it again and fails the same way).
  """
  uid = os.environ.get('PYTEST_XDIST_TESTRUNUID')
  if uid is None:
    return _run_report(argv, devices, timeout)
  key = hashlib.sha256(repr((list(map(str, argv)), devices)).encode())
  base = pathlib.Path(tempfile.gettempdir()) / f'flaxact-tests-{uid}'
  base.mkdir(exist_ok=True)
  path = base / f'{key.hexdigest()[:24]}.json'
  with open(path.with_suffix('.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if path.exists():
      return json.loads(path.read_text())
    report = _run_report(argv, devices, timeout)
    path.write_text(json.dumps(report))
    return report


def _run_report(argv, devices: int, timeout: float) -> dict:
  result = run_on_simulated_devices(*argv, devices=devices, timeout=timeout)
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
