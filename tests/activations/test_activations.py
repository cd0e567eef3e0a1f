"""The generic suite: every activation in ``helpers.CASES`` gets every check."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads
from scipy import special

from tests import helpers
from tests.helpers import CASES

NAMES = sorted(CASES)
HALF = (jnp.bfloat16, jnp.float16)


def _f32_grid() -> np.ndarray:
  dense = np.linspace(-30.0, 30.0, 240_001)
  tiny = np.logspace(-30, 1.5, 4000)
  extremes = np.array([1e4, 1e10, 3e38, -1e4, -1e10, -3e38])
  x = np.concatenate([dense, tiny, -tiny, extremes]).astype(np.float32)
  return x


F32_GRID = _f32_grid()


@pytest.mark.parametrize('name', NAMES)
def test_float32_accuracy_against_float64(name):
  case = CASES[name]
  y = np.asarray(jax.jit(case.fn)(F32_GRID), np.float64)
  with np.errstate(all='ignore'):  # the float32 rounding of the reference
    ref = case.ref(F32_GRID.astype(np.float64)).astype(np.float32)
  ref = ref.astype(np.float64)
  assert np.array_equal(np.isfinite(y), np.isfinite(ref)), name
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(y[~finite], ref[~finite])
  y, ref = y[finite], ref[finite]
  err = np.abs(y - ref) / np.maximum(np.abs(ref), 1e-300)
  main = np.abs(ref) >= 1e-6
  tail = (np.abs(ref) >= 1e-30) & ~main
  assert err[main].max(initial=0) <= helpers.F32_RTOL_MAIN, (
    name,
    F32_GRID[finite][main][np.argmax(err[main])],
    err[main].max(),
  )
  assert err[tail].max(initial=0) <= helpers.F32_RTOL_TAIL, (
    name,
    F32_GRID[finite][tail][np.argmax(err[tail])],
    err[tail].max(),
  )


@pytest.mark.parametrize('dtype', HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize('name', NAMES)
def test_half_precision_within_one_ulp_everywhere(name, dtype):
  """Exhaustive: every finite bf16/f16 input is within 1 ULP."""
  case = CASES[name]
  x = helpers.all_finite_values(dtype)
  y = np.asarray(jax.jit(case.fn)(jnp.asarray(x)))
  assert y.dtype == np.dtype(dtype)
  with np.errstate(all='ignore'):
    ref = case.ref(x.astype(np.float64)).astype(dtype)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  ulps = np.abs(helpers.ordered_bits(y) - helpers.ordered_bits(ref))
  # Two platform effects are allowed, both below the float32 accuracy floor
  # of 1e-30 that the float32 test uses: XLA treats subnormal float32 inputs
  # as zero (CPU and TPU; bfloat16 shares float32's exponent range), and an
  # intermediate that underflows float32 (exp(-88)) may flush a result below
  # 1e-30 to zero.
  with np.errstate(all='ignore'):
    x64 = x.astype(np.float64)
    ref_daz = case.ref(
      np.where(np.abs(x64) < np.finfo(np.float32).tiny, 0.0, x64)
    ).astype(dtype)
    ulps_daz = np.abs(helpers.ordered_bits(y) - helpers.ordered_bits(ref_daz))
    flushed = (np.abs(ref.astype(np.float64)) < 1e-30) & (y == 0)
  ulps = np.where(flushed, 0, np.minimum(ulps, ulps_daz))
  worst = int(np.argmax(ulps))
  assert ulps.max() <= 1, (name, x[worst], y[worst], ref[worst])


@pytest.mark.parametrize('dtype', helpers.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize('name', NAMES)
def test_limits_and_nan(name, dtype):
  case = CASES[name]
  x = jnp.array([-jnp.inf, jnp.inf, jnp.nan], dtype)
  y = np.asarray(case.fn(x))
  with np.errstate(all='ignore'):
    ref = case.ref(np.array([-np.inf, np.inf, np.nan])).astype(dtype)
  np.testing.assert_array_equal(y[:2], ref[:2])
  assert np.isnan(y[2])
  grads = jax.vmap(jax.grad(case.fn))(x[:2])
  assert grads.dtype == np.dtype(dtype)
  expected = np.asarray(case.grad_at_inf).astype(dtype)
  np.testing.assert_array_equal(np.asarray(grads), expected)


@pytest.mark.parametrize('dtype', helpers.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize('name', NAMES)
def test_large_finite_inputs_have_finite_gradients(name, dtype):
  case = CASES[name]
  x = jnp.array([-1e4, -100.0, 100.0, 1e4], dtype)
  grads = np.asarray(jax.vmap(jax.grad(case.fn))(x), np.float64)
  # Every registered derivative is finite at |x| = 1e4 in every dtype
  # (relu_squared's largest, 2e4, is below float16's 65504).
  assert np.all(np.isfinite(grads)), grads
  # And equal to the float64 reference's central difference (step 1e-3 |x|:
  # truncation and rounding far below every dtype's tolerance).
  x64 = np.asarray(x, np.float64)
  h = 1e-3 * np.abs(x64)
  with np.errstate(all='ignore'):
    ref = (case.ref(x64 + h) - case.ref(x64 - h)) / (2 * h)
  np.testing.assert_allclose(grads, ref, **helpers.tol(dtype))


KINKED = sorted(name for name in NAMES if CASES[name].kinks)


def test_kinked_cases_exist():
  """Guards the parametrisation below against an empty list."""
  assert {'relu', 'relu6', 'hard_silu', 'elu'} <= set(KINKED)


@pytest.mark.parametrize('name', KINKED)
def test_exact_derivative_at_kinks(name):
  case = CASES[name]
  for x0, expected in case.kinks.items():
    for dtype in helpers.FLOAT_DTYPES:
      g = jax.grad(case.fn)(jnp.asarray(x0, dtype))
      assert g.dtype == np.dtype(dtype)
      assert float(g) == pytest.approx(expected, rel=helpers.tol(dtype)['rtol'])


SMOOTH_POINTS = np.array([-7.5, -2.7, -0.9, -0.3, 0.4, 1.3, 2.2, 4.1, 7.5])


@pytest.mark.parametrize('name', NAMES)
def test_check_grads_order_two_at_smooth_points(name):
  case = CASES[name]
  with jax.enable_x64(True):
    x = jnp.asarray(SMOOTH_POINTS, jnp.float64)
    check_grads(
      case.fn,
      (x,),
      order=case.smooth_order,
      modes=('fwd', 'rev'),
      **helpers.GRAD_TOL[np.dtype(jnp.float64)],
    )


@pytest.mark.parametrize('name', NAMES)
def test_float32_gradient_matches_float64_gradient(name):
  case = CASES[name]
  x = jnp.asarray(SMOOTH_POINTS, jnp.float32)
  g32 = jax.vmap(jax.grad(case.fn))(x)
  with jax.enable_x64(True):
    g64 = jax.vmap(jax.grad(case.fn))(jnp.asarray(SMOOTH_POINTS, jnp.float64))
    g64 = np.asarray(g64)
  # 1e-5: a derivative is a few more roundings than the value.
  np.testing.assert_allclose(np.asarray(g32), g64, rtol=1e-5, atol=1e-6)


# float64 derivatives for the logistic family, accurate in both tails.
DERIVATIVES = {
  'sigmoid': lambda x: special.expit(x) * special.expit(-x),
  'tanh': lambda x: 1 / np.cosh(x) ** 2,
  'softplus': special.expit,
}


@pytest.mark.parametrize('name', sorted(DERIVATIVES))
def test_float32_derivative_absolute_error(name):
  """Within 1e-7 of float64 everywhere, including derivatives formed from
  the value (sigmoid's y (1 - y)), where it is the absolute error that
  stays small."""
  x = F32_GRID[np.abs(F32_GRID) < 1e3]
  g = np.asarray(jax.jit(jax.vmap(jax.grad(CASES[name].fn)))(x), np.float64)
  with np.errstate(all='ignore'):
    ref = DERIVATIVES[name](x.astype(np.float64))
  err = np.abs(g - ref)
  assert err.max() <= 1e-7, (name, x[np.argmax(err)], err.max())


class TransformsTest(parameterized.TestCase):
  """jit, vmap, jvp, hessian and retracing, for every activation."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_jit_and_eager_agree(self, name):
    fn = CASES[name].fn
    x = jax.random.normal(jax.random.key(0), (4, 5), jnp.float32) * 4
    out = self.variant(fn)(x)
    chex.assert_shape(out, (4, 5))
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_close(out, fn(x), rtol=1e-6, atol=1e-7)

  @parameterized.parameters(*NAMES)
  def test_dtype_and_shape_preserved(self, name):
    fn = CASES[name].fn
    for dtype in helpers.FLOAT_DTYPES:
      x = jnp.linspace(-5, 5, 24, dtype=dtype).reshape(2, 3, 4)
      out = fn(x)
      chex.assert_shape(out, (2, 3, 4))
      chex.assert_type(out, dtype)

  @parameterized.parameters(*NAMES)
  def test_vmap_jvp_and_hessian(self, name):
    fn = CASES[name].fn
    x = jnp.linspace(-4.3, 4.1, 6, dtype=jnp.float32)
    # 1e-6 here: XLA may fuse and round a batched or jvp kernel differently
    # (one ulp) from the plain call.
    chex.assert_trees_all_close(
      jax.vmap(fn)(x.reshape(3, 2)), fn(x).reshape(3, 2), rtol=1e-6, atol=1e-7
    )
    y, dy = jax.jvp(fn, (x,), (jnp.ones_like(x),))
    chex.assert_trees_all_close(y, fn(x), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
      dy, jax.vmap(jax.grad(fn))(x), rtol=1e-6, atol=1e-7
    )
    hess = jax.hessian(lambda v: jnp.sum(fn(v)))(x)
    chex.assert_shape(hess, (6, 6))
    chex.assert_tree_all_finite(hess)
    off_diagonal = hess - jnp.diag(jnp.diag(hess))
    chex.assert_trees_all_close(
      off_diagonal, jnp.zeros_like(hess), rtol=0, atol=0
    )

  @parameterized.parameters(*NAMES)
  def test_no_retracing(self, name):
    fn = CASES[name].fn
    chex.clear_trace_counter()
    traced = jax.jit(chex.assert_max_traces(lambda v: fn(v), n=1))
    x = jnp.ones((3,), jnp.float32)
    traced(x)
    traced(x + 1)
    traced(x * 2)


@pytest.mark.parametrize('bad', [np.arange(3), np.array([True]), 1j])
@pytest.mark.parametrize('name', NAMES)
def test_non_float_input_raises_type_error(name, bad):
  with pytest.raises(TypeError, match='floating-point'):
    CASES[name].fn(bad)


def test_python_scalars_are_accepted():
  assert float(CASES['relu'].fn(3)) == 3.0
  assert CASES['gelu'].fn(1.0).dtype == jnp.float32


def test_jax_nn_tanh_gelu_flushes_where_flaxact_does_not():
  """The documented difference: jax.nn's tanh GELU cancels to -0.0."""
  import flaxact

  assert float(jax.nn.gelu(jnp.float32(-5.0))) == 0.0
  np.testing.assert_allclose(
    float(flaxact.gelu_tanh(jnp.float32(-5.0))),
    float(CASES['gelu_tanh'].ref(np.float64(-5.0))),
    rtol=helpers.F32_RTOL_MAIN,
  )


def test_gelu_default_is_exact_unlike_jax_nn():
  import flaxact

  x = jnp.float32(1.0)
  exact = float(CASES['gelu'].ref(np.float64(1.0)))
  assert float(flaxact.gelu(x)) == pytest.approx(exact, rel=1e-6)
  assert float(jax.nn.gelu(x)) != pytest.approx(exact, rel=1e-6)
  assert float(flaxact.gelu(x, approximate=True)) == float(flaxact.gelu_tanh(x))


def test_parameters_are_differentiable_and_keep_input_dtype():
  import flaxact

  x = jnp.array([-2.0, -0.5, 1.0], jnp.bfloat16)
  slope = jnp.float32(0.2)
  out = flaxact.leaky_relu(x, slope)
  chex.assert_type(out, jnp.bfloat16)
  d_slope = jax.grad(lambda s: jnp.sum(flaxact.leaky_relu(x, s)))(slope)
  assert float(d_slope) == pytest.approx(-2.5)
  beta = jnp.float32(1.5)
  xf = jnp.array([-2.0, 0.5, 3.0], jnp.float32)
  d_beta = jax.grad(lambda b: jnp.sum(flaxact.swish(xf, b)))(beta)
  with jax.enable_x64(True):
    x64 = np.asarray(xf, np.float64)
    s = 1 / (1 + np.exp(-1.5 * x64))
    expected = np.sum(x64**2 * s * (1 - s))
  assert float(d_beta) == pytest.approx(expected, rel=1e-5)
  check_grads(
    lambda b: flaxact.swish(xf, b),
    (beta,),
    order=2,
    modes=('rev',),
    **helpers.GRAD_TOL[np.dtype(jnp.float32)],
  )


@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16), ids=str)
@pytest.mark.parametrize('name', NAMES)
def test_forward_backward_materialises_no_intermediate(name, dtype):
  """Value and derivative each take one pass over x: no temp buffers.

  Read from XLA's compiled memory analysis, which is deterministic. Without
  the optimisation barrier of flaxact._src.common.derivative, XLA writes shared
  transcendental intermediates (erfc's pieces, an f32 copy for bf16) to temp
  memory, as it does for jax.nn.gelu (two hidden-sized temps).
  """
  fn = CASES[name].fn
  x = jnp.ones((1 << 16,), dtype)

  def step(v, g):
    y, vjp = jax.vjp(fn, v)
    return y, vjp(g)[0]

  compiled = jax.jit(step).lower(x, x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes == 0
