"""Test configuration: strict rank promotion, fixed matmul precision and one
compilation cache for the whole run."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

#: The run's compilation cache keeps every compiled module, however quick
#: or small; the xdist workers and every child process the tests start
#: inherit these settings (as ``JAX_...`` environment variables) with the
#: directory.
CACHE_OPTIONS = {
  'jax_persistent_cache_min_compile_time_secs': 0,
  'jax_persistent_cache_min_entry_size_bytes': 0,
}


def pytest_configure(config):
  """Turns on JAX's persistent compilation cache in a fresh directory.

  XLA's compile is most of the suite's time, and many programs are compiled
  again and again: eager calls of the same routed FFN, the same reference in
  several tests, the same layer in the xdist workers and their children. The
  cache keys on the compiled module, its options and the backend, so a hit
  returns the executable a compile would give: the tests see the numerics
  users get. The directory is made by the first process (the xdist
  controller, or pytest alone), inherited by the rest and removed at the end:
  every run starts empty.
  """
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    path = tempfile.mkdtemp(prefix='flaxact-jax-cache-')
    config._flaxact_cache_dir = path  # this process removes it
    os.environ['JAX_COMPILATION_CACHE_DIR'] = path
    os.environ.update({k.upper(): str(v) for k, v in CACHE_OPTIONS.items()})
  jax.config.update(
    'jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR']
  )
  for name, value in CACHE_OPTIONS.items():
    jax.config.update(name, value)


def pytest_unconfigure(config):
  path = getattr(config, '_flaxact_cache_dir', None)
  if path is not None:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)


@pytest.fixture(autouse=True)
def _strict_numerics():
  """Every test runs with rank promotion raising, as STYLE.md asks."""
  with jax.numpy_rank_promotion('raise'):
    yield
