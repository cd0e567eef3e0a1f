"""Tests of the learnable activations PReLU and Swish (Linen and NNX)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.helpers import GRAD_TOL, tol

C = 5
F32_GRAD_TOL = GRAD_TOL[np.dtype(jnp.float32)]


def _x(shape=(7, C), seed=1, dtype=jnp.float32):
  return (2 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _np_prelu(x, a):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x, np.asarray(a, np.float64) * x)


def _np_swish(x, b):
  x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
  return x / (1 + np.exp(-b * x))


def _linen(cls, **kw):
  """A pure function ``f(param, x)`` of a Linen activation and its param."""
  act = cls(**kw)
  name = 'negative_slope' if cls is fl.PReLU else 'beta'
  init = act.init(jax.random.key(0), _x())['params'][name]
  return (lambda p, x: act.apply({'params': {name: p}}, x)), init


def _nnx(cls, **kw):
  name = 'negative_slope' if cls is fx.PReLU else 'beta'
  init = getattr(cls(**kw), name)[...]

  def f(p, x):
    act = cls(**kw)  # built inside the trace, so its Param may be set
    getattr(act, name)[...] = p
    return act(x)

  return f, init


_BUILDERS = {
  'linen': (_linen, fl.PReLU, fl.Swish),
  'nnx': (_nnx, fx.PReLU, fx.Swish),
}


@pytest.fixture(params=sorted(_BUILDERS))
def api(request):
  return _BUILDERS[request.param]


class TestValues:
  @pytest.mark.parametrize('num', [1, C])
  def test_prelu(self, api, num):
    build, prelu, _ = api
    f, a = build(prelu, num_parameters=num)
    assert a.shape == (() if num == 1 else (num,))
    np.testing.assert_array_equal(np.asarray(a), 0.25)
    a = a + jnp.linspace(0.0, 0.4, C) if num == C else a
    x = _x()
    chex.assert_trees_all_close(
      f(a, x), _np_prelu(x, a).astype(np.float32), **tol(jnp.float32)
    )

  @pytest.mark.parametrize('num', [1, C])
  def test_swish(self, api, num):
    build, _, swish = api
    f, b = build(swish, num_parameters=num)
    np.testing.assert_array_equal(np.asarray(b), 1.0)
    b = b + jnp.linspace(-0.5, 0.5, C) if num == C else b + 0.7
    x = _x()
    chex.assert_trees_all_close(
      f(b, x), _np_swish(x, b).astype(np.float32), **tol(jnp.float32)
    )

  def test_custom_init_and_dtype(self, api):
    build, prelu, swish = api
    f, a = build(prelu, negative_slope_init=0.1, param_dtype=jnp.bfloat16)
    assert a.dtype == jnp.bfloat16 and float(a) == pytest.approx(0.1, 1e-2)
    _, b = build(swish, beta_init=1.702)
    assert float(b) == pytest.approx(1.702)
    y = f(a, _x(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


class TestGradients:
  @pytest.mark.parametrize('num', [1, C])
  def test_prelu_slope_gradient_is_sum_of_negative_parts(self, api, num):
    build, prelu, _ = api
    f, a = build(prelu, num_parameters=num)
    x = _x()
    g = jax.grad(lambda a: f(a, x).sum())(a)
    neg = np.minimum(np.asarray(x), 0)
    want = neg.sum() if num == 1 else neg.sum(axis=0)
    chex.assert_trees_all_close(g, want.astype(np.float32), **tol(jnp.float32))

  @pytest.mark.parametrize('num', [1, C])
  def test_swish_beta_gradient(self, api, num):
    build, _, swish = api
    f, b = build(swish, num_parameters=num)
    b = b + 0.3
    x = _x()
    g = jax.grad(lambda b: f(b, x).sum())(b)
    xd, bd = np.asarray(x, np.float64), np.asarray(b, np.float64)
    s = 1 / (1 + np.exp(-bd * xd))
    d = xd * xd * s * (1 - s)  # d/d beta of x sigmoid(beta x)
    want = d.sum() if num == 1 else d.sum(axis=0)
    # float32 sums of 7 terms against float64
    chex.assert_trees_all_close(
      g, want.astype(np.float32), rtol=1e-5, atol=1e-5
    )

  def test_check_grads(self, api):
    build, prelu, swish = api
    x = _x()
    for cls, p in ((prelu, 0.2), (swish, 1.3)):
      f, p0 = build(cls, num_parameters=C)
      # order 1: float32 second differences are too coarse for GRAD_TOL
      check_grads(
        f, (p0 * 0 + p, x), order=1, modes=('fwd', 'rev'), **F32_GRAD_TOL
      )

  def test_sgd_learns_the_slope(self):
    # Data from a PReLU with slope 0.05: training moves 0.25 towards it.
    x = _x((256, C))
    target = _np_prelu(x, 0.05).astype(np.float32)
    act = fl.PReLU()
    params = act.init(jax.random.key(0), x)
    opt = optax.sgd(0.1)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
      loss, g = jax.value_and_grad(
        lambda p: jnp.mean((act.apply(p, x) - target) ** 2)
      )(params)
      updates, state = opt.update(g, state)
      return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(50):
      params, state, loss = step(params, state)
      losses.append(float(loss))
    slope = float(params['params']['negative_slope'])
    assert abs(slope - 0.05) < 0.02 and losses[-1] < 0.01 * losses[0]


class TestInsideFFN:
  @pytest.mark.parametrize('cls', [fl.PReLU, fl.Swish])
  def test_linen_gradient_reaches_the_activation(self, cls):
    H = 8
    layer = fl.GatedFFN(H, activation=cls(H))
    x = _x((4, 3))
    v = nn.unbox(layer.init(jax.random.key(0), x))
    v['params']['activation'] = jax.tree.map(
      lambda p: p + 0.1, v['params']['activation']
    )
    (name,) = v['params']['activation']
    g = jax.grad(lambda v: layer.apply(v, x).sum())(v)

    # The same FFN by hand, as a function of the activation's parameter.
    p = v['params']
    act = cls(H)

    def by_hand(a):
      gate = x @ p['gate_proj']['kernel']
      up = x @ p['up_proj']['kernel']
      h = act.apply({'params': {name: a}}, gate) * up
      return (h @ p['down_proj']['kernel']).sum()

    want = jax.grad(by_hand)(p['activation'][name])
    got = g['params']['activation'][name]
    assert got.shape == (H,) and jnp.any(got != 0)
    chex.assert_trees_all_close(got, want, **tol(jnp.float32))

  def test_nnx_gradient_reaches_the_activation(self):
    H = 8
    layer = fx.FFN(3, H, activation=fx.PReLU(H), rngs=nnx.Rngs(0))
    x = _x((4, 3))
    grads = nnx.grad(lambda m: m(x).sum())(layer)
    got = grads['activation']['negative_slope'][...]
    u = x @ layer.up_proj.kernel[...] + layer.up_proj.bias[...][None]
    # d/da sum(prelu(u, a) @ W) = sum over rows of min(u, 0) * (W @ 1)
    want = jnp.sum(
      jnp.minimum(u, 0) * layer.down_proj.kernel[...].sum(1)[None], 0
    )
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  def test_shared_parameter_in_linen_and_nnx_gives_equal_outputs(self):
    lin = fl.GatedFFN(6, activation=fl.Swish())
    nx = fx.GatedFFN(3, 6, activation=fx.Swish(), rngs=nnx.Rngs(0))
    x = _x((4, 3))
    v = nn.unbox(lin.init(jax.random.key(0), x))
    v = jax.tree.map(lambda a: a + 0.2, v)
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      getattr(nx, name).kernel[...] = v['params'][name]['kernel']
    nx.activation.beta[...] = v['params']['activation']['beta']
    chex.assert_trees_all_equal(lin.apply(v, x), nx(x))


class TestErrors:
  @pytest.mark.parametrize('bad', [0, -2, 1.5, True])
  def test_bad_num_parameters(self, api, bad):
    build, prelu, _ = api
    with pytest.raises(ValueError, match='num_parameters must be a positive'):
      build(prelu, num_parameters=bad)

  def test_channel_mismatch(self):
    act = fx.Swish(4)
    with pytest.raises(
      ValueError, match=r'expected input of shape \(\.\.\., 4\).*got shape'
    ):
      act(_x((2, 3)))
    with pytest.raises(ValueError, match=r'\(\.\.\., 4\)'):
      fl.PReLU(4).init(jax.random.key(0), _x((2, 3)))

  def test_non_float_input(self):
    with pytest.raises(TypeError, match='floating-point'):
      fx.PReLU()(jnp.arange(3))
