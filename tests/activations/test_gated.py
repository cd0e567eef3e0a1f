"""Split-form gated functions and the two-array gated product."""

import io
from contextlib import redirect_stdout

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import flaxact
from tests import helpers
from tests.helpers import CASES, GATED_CASES

GATED = sorted(GATED_CASES)
# The activation each split-form function applies to its gate half.
GATE_ACTIVATION = {
  'glu': 'sigmoid',
  'reglu': 'relu',
  'geglu': 'gelu',
  'geglu_tanh': 'gelu_tanh',
  'swiglu': 'silu',
  'bilinear': 'identity',
}


def _input(shape, dtype=jnp.float32, seed=0):
  return (
    jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
    * 3
  )


@pytest.mark.parametrize('dtype', helpers.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize('name', GATED)
def test_split_form_matches_float64_reference(name, dtype):
  fn, ref = GATED_CASES[name]
  x = _input((5, 16), dtype)
  out = fn(x)
  chex.assert_shape(out, (5, 8))
  chex.assert_type(out, dtype)
  expected = ref(np.asarray(x, np.float64))
  np.testing.assert_allclose(
    np.asarray(out, np.float64), expected, **helpers.tol(dtype)
  )


@pytest.mark.parametrize('name', GATED)
def test_value_first_gate_second(name):
  """a * act(b): the order of jax.nn.glu and torch.nn.functional.glu."""
  fn, _ = GATED_CASES[name]
  a = jnp.array([1.5, -2.0, 0.5])
  b = jnp.array([0.7, 1.2, -0.4])
  act = flaxact.get_activation(GATE_ACTIVATION[name])
  chex.assert_trees_all_close(
    fn(jnp.concatenate([a, b])), a * act(b), rtol=1e-6, atol=1e-7
  )
  if name == 'glu':
    chex.assert_trees_all_close(
      fn(jnp.concatenate([a, b])),
      jax.nn.glu(jnp.concatenate([a, b])),
      rtol=1e-6,
      atol=1e-7,
    )


@pytest.mark.parametrize('name', GATED)
def test_axis_argument(name):
  fn, _ = GATED_CASES[name]
  x = _input((6, 4))
  chex.assert_trees_all_close(fn(x, axis=0), fn(x.T).T, rtol=0, atol=0)
  chex.assert_shape(fn(x, axis=-2), (3, 4))


@pytest.mark.parametrize('name', GATED)
def test_odd_size_and_bad_axis_raise(name):
  fn, _ = GATED_CASES[name]
  with pytest.raises(ValueError, match=r'even.*got 7'):
    fn(jnp.ones((2, 7)))
  with pytest.raises(ValueError, match='out of range'):
    fn(jnp.ones((2, 8)), axis=2)
  with pytest.raises(TypeError, match='floating-point'):
    fn(jnp.ones((2, 8), jnp.int32))


@pytest.mark.parametrize('name', GATED)
def test_split_form_grads_and_transforms(name):
  fn, _ = GATED_CASES[name]
  with jax.enable_x64(True):
    # Points away from the ReLU kink so finite differences are valid.
    x = jnp.asarray([[0.3, -1.2, 2.1, 0.8, -0.7, 1.9, -2.4, 0.6]], jnp.float64)
    check_grads(
      fn,
      (x,),
      order=2,
      modes=('fwd', 'rev'),
      **helpers.GRAD_TOL[np.dtype(jnp.float64)],
    )
  x = _input((3, 2, 8))
  chex.assert_trees_all_close(jax.vmap(fn)(x), fn(x), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(jax.jit(fn)(x), fn(x), rtol=1e-6, atol=1e-7)


def _count_hidden_residuals(f, *args, hidden_shape):
  buf = io.StringIO()
  with redirect_stdout(buf):
    print_saved_residuals(f, *args)
  shape = 'f32[' + ','.join(map(str, hidden_shape)) + ']'
  return sum(line.startswith(shape) for line in buf.getvalue().splitlines())


def test_gated_product_keeps_two_hidden_residuals():
  gate, up = _input((4, 32), seed=1), _input((4, 32), seed=2)

  def loss(fn):
    return lambda g, u: jnp.sum(fn(g, u))

  ours = _count_hidden_residuals(
    loss(flaxact.gated_product), gate, up, hidden_shape=(4, 32)
  )
  plain = _count_hidden_residuals(
    loss(lambda g, u: jax.nn.silu(g) * u), gate, up, hidden_shape=(4, 32)
  )
  assert ours == 2
  assert plain == 5


def test_gated_product_memory_from_compiled_analysis():
  """The same saving, in bytes of the residuals the vjp closes over."""
  gate, up = _input((256, 1024), seed=1), _input((256, 1024), seed=2)

  def residual_bytes(fn):
    def fwd(g, u):
      _, vjp = jax.vjp(fn, g, u)
      return vjp

    out = jax.eval_shape(fwd, gate, up)
    leaves = jax.tree.leaves(out)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)

  ours = residual_bytes(flaxact.gated_product)
  plain = residual_bytes(lambda g, u: jax.nn.silu(g) * u)
  hidden = gate.size * gate.dtype.itemsize
  assert ours == 2 * hidden
  assert plain >= 4 * hidden


@pytest.mark.parametrize(
  'activation', ['silu', 'gelu', 'gelu_tanh', 'relu', 'sigmoid', 'identity']
)
def test_gated_product_agrees_with_plain_autodiff(activation):
  act = flaxact.get_activation(activation)
  gate, up = _input((8, 16), seed=1), _input((8, 16), seed=2)
  cot = _input((8, 16), seed=3)

  def ours(g, u):
    return flaxact.gated_product(g, u, activation)

  def plain(g, u):
    return act(g) * u

  y1, vjp1 = jax.vjp(ours, gate, up)
  y2, vjp2 = jax.vjp(plain, gate, up)
  chex.assert_trees_all_close(y1, y2, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(vjp1(cot), vjp2(cot), rtol=2e-6, atol=1e-6)
  t = (_input((8, 16), seed=4), _input((8, 16), seed=5))
  _, jvp1 = jax.jvp(ours, (gate, up), t)
  _, jvp2 = jax.jvp(plain, (gate, up), t)
  chex.assert_trees_all_close(jvp1, jvp2, rtol=2e-6, atol=1e-6)


def test_gated_product_second_order_vmap_jit():
  with jax.enable_x64(True):
    g = jnp.asarray([0.3, -1.2, 2.1, 0.8], jnp.float64)
    u = jnp.asarray([1.1, -0.4, 0.9, 2.0], jnp.float64)
    for act in ('silu', 'gelu', 'gelu_tanh', 'sigmoid'):
      check_grads(
        lambda a, b, act=act: flaxact.gated_product(a, b, act),
        (g, u),
        order=2,
        modes=('fwd', 'rev'),
        **helpers.GRAD_TOL[np.dtype(jnp.float64)],
      )
    hess = jax.hessian(lambda a: jnp.sum(flaxact.gated_product(a, u)))(g)
    plain = jax.hessian(lambda a: jnp.sum(jax.nn.silu(a) * u))(g)
    chex.assert_shape(hess, (4, 4))
    chex.assert_trees_all_close(hess, plain, rtol=1e-12, atol=1e-12)
  gate, up = _input((3, 4, 8), seed=1), _input((3, 4, 8), seed=2)
  chex.assert_trees_all_close(
    jax.vmap(flaxact.gated_product)(gate, up),
    jax.jit(flaxact.gated_product)(gate, up),
    rtol=1e-6,
    atol=1e-7,
  )


@pytest.mark.parametrize('dtype', helpers.FLOAT_DTYPES, ids=str)
def test_gated_product_dtype_and_single_rounding(dtype):
  gate = _input((4, 8), dtype, seed=1)
  up = _input((4, 8), dtype, seed=2)
  out = flaxact.gated_product(gate, up)
  chex.assert_type(out, dtype)
  g64, u64 = np.asarray(gate, np.float64), np.asarray(up, np.float64)
  ref = (CASES['silu'].ref(g64) * u64).astype(dtype)
  if np.dtype(dtype).itemsize == 2:
    # Computed in float32 and rounded once: within one ulp of the reference.
    ulps = np.abs(
      helpers.ordered_bits(np.asarray(out)) - helpers.ordered_bits(ref)
    )
    assert ulps.max() <= 1
  else:
    np.testing.assert_allclose(
      np.asarray(out, np.float64), ref, **helpers.tol(dtype)
    )
  grads = jax.grad(lambda g: jnp.sum(flaxact.gated_product(g, up)))(gate)
  chex.assert_type(grads, dtype)


def test_gated_product_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r'same shape.*\(2, 4\).*\(2, 5\)'):
    flaxact.gated_product(jnp.ones((2, 4)), jnp.ones((2, 5)))
  with pytest.raises(TypeError, match='same dtype'):
    flaxact.gated_product(jnp.ones(3), jnp.ones(3, jnp.bfloat16))
  with pytest.raises(TypeError, match='floating-point'):
    flaxact.gated_product(jnp.ones(3, jnp.int32), jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match='unknown activation'):
    flaxact.gated_product(jnp.ones(3), jnp.ones(3), 'swishh')
