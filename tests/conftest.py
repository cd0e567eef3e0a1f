"""Test configuration: strict rank promotion, and XLA's quick CPU codegen.

The suite's time is mostly XLA compiling thousands of small programs, so
the tests ask XLA:CPU for its unoptimised LLVM backend
(``--xla_backend_optimization_level=0``; about a third less time here): the
HLO passes, fusion and the matmul and reduction kernels are the same, only
LLVM's optimisation of the emitted loops is skipped, which changes no
float32 result (XLA does not enable fast-math). The flag is set before JAX
starts its backend and reaches every child process (the multi-device
scripts, the examples, the notebooks). ``FLAXACT_TEST_XLA_OPT=1`` keeps the
default optimisation, for a run that should match users' builds exactly.
"""

import os

if os.environ.get('FLAXACT_TEST_XLA_OPT') != '1':
  _QUICK = '--xla_backend_optimization_level=0'
  _flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_backend_optimization_level' not in _flags:
    os.environ['XLA_FLAGS'] = f'{_flags} {_QUICK}'.strip()

import jax  # after XLA_FLAGS
import pytest


@pytest.fixture(autouse=True)
def _strict_numerics():
  """Every test runs with rank promotion raising, as STYLE.md asks."""
  with jax.numpy_rank_promotion('raise'):
    yield
