"""Shared test helpers: the dtype-keyed tolerance table and float64 helpers.

Every tolerance in the suite comes from :data:`TOL`; a test that needs
another value says why at the call site.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Starting from JAX's own test tolerances (jax._src.public_test_util).
TOL = {
  # forward value, relative (atol/rtol for assert_trees_all_close)
  np.dtype(jnp.float32): dict(rtol=1e-6, atol=1e-6),
  np.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2),
  np.dtype(jnp.float16): dict(rtol=1e-3, atol=1e-3),
  np.dtype(jnp.float64): dict(rtol=1e-12, atol=1e-12),
}
# finite-difference gradient checks (jax.test_util.check_grads)
GRAD_TOL = {
  np.dtype(jnp.float32): dict(atol=2e-3, rtol=2e-3),
  np.dtype(jnp.float64): dict(atol=1e-5, rtol=1e-5),
}
# float32 accuracy goals of the activations against a float64 reference
F32_RTOL_MAIN = 2e-6  # wherever |y| >= 1e-6
F32_RTOL_TAIL = 2e-5  # wherever 1e-30 <= |y| < 1e-6

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def tol(dtype) -> dict:
  """The forward tolerance for ``dtype``."""
  return TOL[np.dtype(dtype)]
