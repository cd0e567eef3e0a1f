"""Properties of every registered element-wise activation over any float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.helpers import CASES, tol

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
EDGES = [0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 1e-40, -1e-40, 5e-324]


@st.composite
def inputs(draw):
  dtype = draw(st.sampled_from(DTYPES))
  finite = st.floats(allow_nan=False, width=32)
  values = draw(
    hnp.arrays(
      np.float32, (16,), elements=st.one_of(finite, st.sampled_from(EDGES))
    )
  )
  return jnp.asarray(values).astype(dtype)


@given(st.sampled_from(sorted(CASES)), inputs())
def test_no_nan_for_non_nan_input_and_value_matches_float64(name, x):
  case = CASES[name]
  note(
    f'flaxact.{name}(jnp.array({np.asarray(x, np.float32).tolist()},'
    f' {x.dtype.name!r}))'
  )
  y = jax.jit(case.fn)(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  assert not np.isnan(np.asarray(y, np.float32)).any()
  x64 = np.asarray(x, np.float64)
  with np.errstate(all='ignore'):
    want = np.asarray(case.ref(x64), np.float64)
  ok = np.isfinite(want) & (np.abs(want) < 1e4)
  with np.errstate(all='ignore'):  # huge references overflow the dtype
    want_rounded = want.astype(x.dtype).astype(np.float64)
  got = np.asarray(y, np.float64)
  # the reference rounded to the dtype, then the dtype's own tolerance
  np.testing.assert_allclose(got[ok], want_rounded[ok], **tol(x.dtype))


@given(
  st.sampled_from(sorted(CASES)),
  st.floats(-20, 20, allow_nan=False).filter(lambda v: abs(v) > 1e-3),
)
def test_gradient_matches_float64_finite_differences(name, v):
  case = CASES[name]
  if any(abs(v - k) < 1e-2 for k in case.kinks):
    return  # away from kinks
  note(f'jax.grad(flaxact.{name})({v!r})')
  g = float(jax.grad(lambda x: case.fn(x))(jnp.float32(v)))
  assert np.isfinite(g)
  eps = 1e-6
  fd = (case.ref(np.float64(v + eps)) - case.ref(np.float64(v - eps))) / (
    2 * eps
  )
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)  # f32 grad
