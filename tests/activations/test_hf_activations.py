"""Hugging Face's ACT2FN extras against the stored ``transformers`` outputs,
and xIELU: the function and the learnable ``XIELU`` layers.

The generic suite (tests/test_activations.py) covers ``gelu_10``,
``sqrt_softplus`` and ``laplace`` against float64 references; here they meet
Hugging Face's own modules (``tests/data/torch_reference.npz``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.activations.xielu import effective_parameters, raw_parameters
from tests import helpers
from tests.torch_helpers import ACT_REFERENCE


@pytest.mark.parametrize(
  'name', ['gelu_10', 'sqrtsoftplus', 'laplace', 'gelu_python_tanh']
)
def test_matches_transformers_act2fn(name):
  case = ACT_REFERENCE[name]
  fn = flaxact.get_activation(name)
  x = jnp.asarray(case['x'])
  y = np.asarray(fn(x))
  g = np.asarray(jax.vmap(jax.grad(fn))(x))
  ref = case['y']
  if name == 'laplace':
    # HF's float32 1 + erf cancels in the lower tail; flaxact keeps the
    # value (checked against float64 in the generic suite).
    keep = ref > 1e-6
    assert np.all(y[~keep] >= 0) and np.all(y[~keep] <= 2e-6)
    y, ref, g, case_g = y[keep], ref[keep], g[keep], case['g'][keep]
  else:
    case_g = case['g']
  if name == 'sqrtsoftplus':
    # torch's derivative is NaN where its softplus underflows to 0 (x =
    # -200); flaxact's is e^(x/2)/2 there, finite.
    assert np.all(np.isfinite(g))
    finite = np.isfinite(case_g)
    assert not finite.all()
    g, case_g = g[finite], case_g[finite]
  np.testing.assert_allclose(y, ref, **helpers.tol(jnp.float32))
  # 1e-5: torch and flaxact round their derivative formulas differently.
  np.testing.assert_allclose(g, case_g, rtol=1e-5, atol=1e-6)


def _xielu_ref(x, ap=0.8, an=0.8, beta=0.5, eps=-1e-6):
  x = np.asarray(x, np.float64)
  with np.errstate(all='ignore'):
    neg = an * np.expm1(np.minimum(x, eps)) + (beta - an) * x
    return np.where(x > 0, ap * x * x + beta * x, neg)


def test_xielu_matches_transformers_module():
  case = ACT_REFERENCE['xielu']
  sd = case['sd']
  ap, an = effective_parameters(
    jnp.asarray(sd['alpha_p'][0]), jnp.asarray(sd['alpha_n'][0]), 0.5
  )
  x = jnp.asarray(case['x'])
  y = flaxact.xielu(x, ap, an, beta=float(sd['beta']), eps=float(sd['eps']))
  np.testing.assert_allclose(y, case['y'], rtol=1e-6, atol=1e-6)
  g = jax.vmap(jax.grad(lambda v: flaxact.xielu(v, ap, an)))(x)
  np.testing.assert_allclose(g, case['g'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('framework', ['linen', 'nnx'])
def test_xielu_layers_load_the_transformers_parameters(framework):
  """Raw alpha_p/alpha_n load as they are; values and their gradients."""
  case = ACT_REFERENCE['xielu']
  raw = {
    k: jnp.asarray(case['sd'][k].reshape(())) for k in ('alpha_p', 'alpha_n')
  }
  x = jnp.asarray(case['x'])
  if framework == 'linen':
    act = fl.XIELU()

    def f(params):
      return jnp.sum(act.apply({'params': params}, x))

    y = act.apply({'params': raw}, x)
    grads = jax.grad(f)(raw)
  else:
    act = fx.XIELU()
    act.alpha_p.set_value(raw['alpha_p'])
    act.alpha_n.set_value(raw['alpha_n'])
    y = act(x)
    from flax import nnx

    grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x)))(act))
  np.testing.assert_allclose(y, case['y'], rtol=1e-6, atol=1e-6)
  # 1e-5: a sum over 489 points of differently rounded terms.
  np.testing.assert_allclose(grads['alpha_p'], case['g_alpha_p'][0], rtol=1e-5)
  np.testing.assert_allclose(grads['alpha_n'], case['g_alpha_n'][0], rtol=1e-5)


def test_xielu_layers_initialise_as_transformers():
  raw_p, raw_n = raw_parameters(0.8, 0.8, 0.5)
  act = fx.XIELU()
  assert float(act.alpha_p[...]) == pytest.approx(np.log(np.expm1(0.8)))
  assert float(act.alpha_n[...]) == pytest.approx(np.log(np.expm1(0.3)))
  assert (raw_p, raw_n) == pytest.approx(
    (np.log(np.expm1(0.8)), np.log(np.expm1(0.3)))
  )
  x = jnp.linspace(-5.0, 5.0, 11)
  np.testing.assert_allclose(act(x), flaxact.xielu(x), rtol=1e-6, atol=1e-7)
  variables = fl.XIELU().init(jax.random.key(0), x)
  np.testing.assert_allclose(
    fl.XIELU().apply(variables, x), act(x), rtol=0, atol=0
  )


def test_xielu_per_channel_and_inside_an_ffn():
  act = fx.XIELU(4, alpha_p_init=1.2)
  assert act.alpha_p.shape == (4,)
  with pytest.raises(
    ValueError, match=r'XIELU: expected input of shape \(\.\.\., 4\)'
  ):
    act(jnp.ones((2, 3)))
  from flax import nnx

  layer = fx.FFN(4, 8, activation=fx.XIELU(8), rngs=nnx.Rngs(0))
  assert layer(jnp.ones((2, 4))).shape == (2, 4)
  linen_layer = fl.FFN(8, activation=fl.XIELU(8))
  variables = linen_layer.init(jax.random.key(0), jnp.ones((2, 4)))
  assert variables['params']['activation']['alpha_n'].shape == (8,)


@pytest.mark.parametrize(
  'bad', [dict(alpha_p_init=0.0), dict(alpha_n_init=0.4)]
)
def test_xielu_rejects_parameters_outside_the_parameterisation(bad):
  with pytest.raises(ValueError, match='XIELU: alpha_'):
    fx.XIELU(**bad)
  with pytest.raises(ValueError, match='XIELU: alpha_'):
    fl.XIELU(**bad)


# --- the function: reference, dtypes, limits, derivatives --------------------


def test_xielu_float32_against_float64():
  """Relative to the size of its terms: the function has a root near -2.3
  where alpha_n expm1(x) and (beta - alpha_n) x cancel, and relative error
  to the (tiny) result is not meaningful there."""
  x = np.linspace(-30.0, 30.0, 240_001).astype(np.float32)
  y = np.asarray(jax.jit(flaxact.xielu)(x), np.float64)
  ref = _xielu_ref(x)
  x64 = x.astype(np.float64)
  scale = np.where(
    x64 > 0,
    0.8 * x64 * x64 + 0.5 * x64,
    0.8 * np.abs(np.expm1(np.minimum(x64, -1e-6))) + 0.3 * np.abs(x64),
  )
  err = np.abs(y - ref) / np.maximum(scale, 1e-30)
  assert err.max() <= helpers.F32_RTOL_MAIN, x[np.argmax(err)]
  away = np.abs(ref) > 0.1 * scale  # away from the root: plain relative
  rel = np.abs(y - ref)[away] / np.abs(ref)[away]
  assert rel.max() <= helpers.F32_RTOL_MAIN, rel.max()


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16], ids=str)
def test_xielu_half_precision_within_one_ulp_away_from_the_root(dtype):
  x = helpers.all_finite_values(dtype)
  y = np.asarray(jax.jit(flaxact.xielu)(jnp.asarray(x)))
  assert y.dtype == np.dtype(dtype)
  with np.errstate(all='ignore'):
    ref64 = _xielu_ref(x.astype(np.float64))
    ref = ref64.astype(dtype)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  x64 = x.astype(np.float64)
  near_root = np.abs(x64 + 2.3) < 0.1  # cancellation: see the float32 test
  # XLA flushes float32 subnormals (inputs and results) to zero, as the
  # generic suite allows.
  tiny = (np.abs(x64) < np.finfo(np.float32).tiny) | (
    (np.abs(ref64) < 1e-30) & (y == 0)
  )
  ok = np.isfinite(ref64) & ~near_root & ~tiny
  ulps = np.abs(helpers.ordered_bits(y) - helpers.ordered_bits(ref))[ok]
  assert ulps.max() <= 1, x[ok][np.argmax(ulps)]
  # Near the root: the float32 rounding of the terms, ~1e-7 absolute.
  err = np.abs(y[near_root].astype(np.float64) - ref64[near_root])
  ulps = np.abs(
    helpers.ordered_bits(y[near_root]) - helpers.ordered_bits(ref[near_root])
  )
  assert np.all((ulps <= 1) | (err <= 2e-7)), err.max()


def test_xielu_limits_kinks_and_gradients():
  x = jnp.array([-jnp.inf, jnp.inf, jnp.nan])
  y = flaxact.xielu(x)
  assert float(y[0]) == np.inf and float(y[1]) == np.inf and np.isnan(y[2])
  grad = jax.grad(flaxact.xielu)
  assert float(grad(-jnp.inf)) == pytest.approx(-0.3)
  # At 0: the x <= 0 branch with the clamp active: beta - alpha_n (PyTorch).
  for dtype in helpers.FLOAT_DTYPES:
    g = grad(jnp.asarray(0.0, dtype))
    assert g.dtype == np.dtype(dtype)
    assert float(g) == pytest.approx(-0.3, rel=helpers.tol(dtype)['rtol'])
  big = jax.vmap(grad)(jnp.array([-1e4, -100.0, 100.0, 1e4]))
  chex.assert_tree_all_finite(big)
  with jax.enable_x64(True):
    pts = jnp.asarray([-7.5, -2.7, -0.9, -0.3, 0.4, 1.3, 2.2, 4.1], jnp.float64)
    ap, an = jnp.float64(1.1), jnp.float64(0.9)
    check_grads(
      lambda v, a, b: flaxact.xielu(v, a, b),
      (pts, ap, an),
      order=2,
      modes=('fwd', 'rev'),
      **helpers.GRAD_TOL[np.dtype(jnp.float64)],
    )


def test_xielu_transforms_and_dtypes():
  x = jax.random.normal(jax.random.key(0), (4, 5)) * 4
  chex.assert_trees_all_close(
    jax.jit(flaxact.xielu)(x), flaxact.xielu(x), rtol=1e-6, atol=1e-7
  )
  chex.assert_trees_all_close(
    jax.vmap(flaxact.xielu)(x), flaxact.xielu(x), rtol=1e-6, atol=1e-7
  )
  for dtype in helpers.FLOAT_DTYPES:
    out = flaxact.xielu(jnp.linspace(-5, 5, 24, dtype=dtype).reshape(2, 3, 4))
    chex.assert_shape(out, (2, 3, 4))
    chex.assert_type(out, dtype)
  with pytest.raises(TypeError, match='floating-point'):
    flaxact.xielu(np.arange(3))
