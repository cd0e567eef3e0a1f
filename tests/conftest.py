"""Test configuration: strict rank promotion and fixed matmul precision."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_numerics():
  """Every test runs with rank promotion raising, as STYLE.md asks."""
  with jax.numpy_rank_promotion('raise'):
    yield
