"""Tests of the Linen FFN layers: params, numerics, options and errors."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

import flaxact
from flaxact import linen as fl
from flaxact._src.layers.remat import CHECKPOINT_NAMES
from tests.helpers import GRAD_TOL, tol
from tests.layer_helpers import checkpoint_names, residuals_of_shape

D, H, T = 12, 20, 6

_REF_ACT = {
  'silu': lambda z: z / (1 + np.exp(-z)),
  'gelu': lambda z: 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2))),
  'relu': lambda z: np.maximum(z, 0),
}
_GATED = [(fl.SwiGLU, 'silu'), (fl.GeGLU, 'gelu'), (fl.ReGLU, 'relu')]
# A matmul of K float32 terms is off its float64 value by up to ~K ulp.
MATMUL_TOL = dict(rtol=2e-5, atol=2e-5)


def _x(shape=(T, D), dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _p(variables):
  return jax.tree.map(np.asarray, nn.unbox(variables)['params'])


def _ref_gated(p, x, act, bias=False):
  x = np.asarray(x, np.float64)
  k = {n: np.asarray(p[n]['kernel'], np.float64) for n in p}
  b = {n: np.asarray(p[n]['bias'], np.float64) if bias else 0.0 for n in p}
  g = x @ k['gate_proj'] + b['gate_proj']
  u = x @ k['up_proj'] + b['up_proj']
  return (_REF_ACT[act](g) * u) @ k['down_proj'] + b['down_proj']


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


class TestParams:
  def test_gated_tree_shapes_and_no_bias_default(self):
    v = fl.SwiGLU(H).init(jax.random.key(0), _x())
    chex.assert_trees_all_equal(
      jax.tree.map(jnp.shape, nn.unbox(v)),
      {
        'params': {
          'gate_proj': {'kernel': (D, H)},
          'up_proj': {'kernel': (D, H)},
          'down_proj': {'kernel': (H, D)},
        }
      },
    )

  def test_bias_out_features_and_fused(self):
    v = fl.GatedFFN(H, 5, use_bias=True, fused_gate_up=True).init(
      jax.random.key(0), _x()
    )
    chex.assert_trees_all_equal(
      jax.tree.map(jnp.shape, nn.unbox(v)),
      {
        'params': {
          'gate_up_proj': {'kernel': (D, 2, H), 'bias': (2, H)},
          'down_proj': {'kernel': (H, 5), 'bias': (5,)},
        }
      },
    )

  def test_ffn_tree_has_bias_by_default(self):
    v = fl.FFN(H).init(jax.random.key(0), _x())
    chex.assert_trees_all_equal(
      jax.tree.map(jnp.shape, nn.unbox(v)),
      {
        'params': {
          'up_proj': {'kernel': (D, H), 'bias': (H,)},
          'down_proj': {'kernel': (H, D), 'bias': (D,)},
        }
      },
    )

  def test_logical_axis_names(self):
    v = fl.SwiGLU(H, use_bias=True).init(jax.random.key(0), _x())
    specs = nn.get_partition_spec(v)['params']
    P = jax.sharding.PartitionSpec
    assert specs['gate_proj']['kernel'] == P('embed', 'mlp')
    assert specs['up_proj']['kernel'] == P('embed', 'mlp')
    assert specs['gate_proj']['bias'] == P('mlp')
    assert specs['down_proj']['kernel'] == P('mlp', 'embed')
    assert specs['down_proj']['bias'] == P('embed')
    fused = fl.SwiGLU(H, fused_gate_up=True).init(jax.random.key(0), _x())
    assert nn.get_partition_spec(fused)['params']['gate_up_proj'][
      'kernel'
    ] == P('embed', None, 'mlp')

  def test_default_init_is_lecun_normal(self):
    x = _x((4, 256))
    p = _p(fl.SwiGLU(512).init(jax.random.key(0), x))
    # LeCun normal: std 1/sqrt(fan_in); zero mean.
    for name, fan_in in (('gate_proj', 256), ('down_proj', 512)):
      k = p[name]['kernel']
      assert abs(k.std() * np.sqrt(fan_in) - 1) < 0.05, name
      assert abs(k.mean()) < 0.01

  def test_fused_init_has_unfused_scale(self):
    p = _p(fl.SwiGLU(512, fused_gate_up=True).init(_key(), _x((4, 256))))
    k = p['gate_up_proj']['kernel']
    for half in (k[:, 0], k[:, 1]):
      assert abs(half.std() * np.sqrt(256) - 1) < 0.05
    assert not np.array_equal(k[:, 0], k[:, 1])

  def test_param_dtype(self):
    v = fl.SwiGLU(H, param_dtype=jnp.bfloat16).init(_key(), _x())
    for leaf in jax.tree.leaves(nn.unbox(v)):
      assert leaf.dtype == jnp.bfloat16


def _key(seed=0):
  return jax.random.key(seed)


class TestNumerics:
  @pytest.mark.parametrize('cls,act', _GATED)
  @pytest.mark.parametrize('bias', [False, True])
  def test_gated_matches_float64_reference(self, cls, act, bias):
    x = _x()
    layer = cls(H, use_bias=True) if bias else cls(H)
    v = layer.init(_key(), x)
    if bias:  # non-zero biases, so they are exercised
      v = jax.tree.map(lambda a: a + 0.1, nn.unbox(v))
    y = layer.apply(v, x)
    ref = _ref_gated(_p(v), x, act, bias)
    chex.assert_trees_all_close(y, ref.astype(np.float32), **MATMUL_TOL)

  def test_ffn_matches_float64_reference(self):
    x = _x()
    layer = fl.FFN(H, 7)
    v = jax.tree.map(lambda a: a + 0.05, nn.unbox(layer.init(_key(), x)))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
    xd = np.asarray(x, np.float64)
    u = xd @ p['up_proj']['kernel'] + p['up_proj']['bias']
    ref = _REF_ACT['gelu'](u) @ p['down_proj']['kernel']
    ref = ref + p['down_proj']['bias']
    y = layer.apply(v, x)
    assert y.shape == (T, 7)
    chex.assert_trees_all_close(y, ref.astype(np.float32), **MATMUL_TOL)

  @pytest.mark.parametrize('cls', [fl.SwiGLU, fl.FFN])
  def test_remat_changes_nothing(self, cls):
    x = _x((2, 3, D))
    lean, plain = cls(H), cls(H, remat=False)
    v = lean.init(_key(), x)

    def loss(layer):
      return lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))

    chex.assert_trees_all_equal(lean.apply(v, x), plain.apply(v, x))
    g_lean = jax.jit(jax.grad(loss(lean), argnums=(0, 1)))(v, x)
    g_plain = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(v, x)
    chex.assert_trees_all_close(g_lean, g_plain, **tol(jnp.float32))

  @pytest.mark.parametrize('bias', [False, True])
  def test_fused_equals_unfused_exactly(self, bias):
    x = _x()
    unfused = fl.SwiGLU(H, use_bias=bias)
    v = nn.unbox(unfused.init(_key(), x))
    if bias:
      v = jax.tree.map(lambda a: a + 0.1, v)
    p = v['params']
    fused_p = {
      'gate_up_proj': {
        'kernel': jnp.stack(
          [p['gate_proj']['kernel'], p['up_proj']['kernel']], axis=1
        )
      },
      'down_proj': p['down_proj'],
    }
    if bias:
      fused_p['gate_up_proj']['bias'] = jnp.stack(
        [p['gate_proj']['bias'], p['up_proj']['bias']]
      )
    fused = fl.SwiGLU(H, use_bias=bias, fused_gate_up=True)
    y_fused = jax.jit(fused.apply)({'params': fused_p}, x)
    chex.assert_trees_all_equal(y_fused, jax.jit(unfused.apply)(v, x))

  def test_check_grads_second_order(self):
    x = _x((3, 4))
    layer = fl.GatedFFN(5, activation='gelu', use_bias=True)
    v = layer.init(_key(), x)
    check_grads(
      lambda v, x: layer.apply(v, x),
      (v, x),
      order=2,
      modes=('rev',),  # forward mode: test_jvp_matches_grad
      **GRAD_TOL[np.dtype(jnp.float32)],
    )

  def test_jvp_matches_grad(self):
    x = _x((3, D))
    layer = fl.SwiGLU(H)
    v = layer.init(_key(), x)
    t = jax.random.normal(_key(7), x.shape)
    _, jvp = jax.jvp(lambda x: layer.apply(v, x), (x,), (t,))
    g = jax.grad(lambda x: jnp.sum(layer.apply(v, x)))(x)
    # <1, J t> == <J^T 1, t>: sums of 3*D float32 products
    chex.assert_trees_all_close(
      jnp.sum(jvp), jnp.sum(g * t), rtol=1e-5, atol=1e-5
    )

  def test_jit_and_eager_agree(self):
    x = _x()
    layer = fl.SwiGLU(H)
    v = layer.init(_key(), x)
    chex.assert_trees_all_close(
      jax.jit(layer.apply)(v, x), layer.apply(v, x), **tol(jnp.float32)
    )


class TestDtypes:
  @pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
  @pytest.mark.parametrize('cls', [fl.SwiGLU, fl.FFN])
  def test_output_dtype_is_input_dtype(self, cls, dtype):
    x = _x(dtype=dtype)
    layer = cls(H)
    v = layer.init(_key(), x)
    y = layer.apply(v, x)
    assert y.dtype == dtype
    y32 = layer.apply(v, x.astype(jnp.float32))
    chex.assert_trees_all_close(y.astype(jnp.float32), y32, **tol(dtype))

  def test_dtype_overrides_input(self):
    x = _x()
    layer = fl.SwiGLU(H, dtype=jnp.bfloat16)
    v = layer.init(_key(), x)
    assert layer.apply(v, x).dtype == jnp.bfloat16

  def test_activations_in_float32(self):
    calls = []

    def spy(lhs, rhs, dims, precision=None, preferred_element_type=None):
      out = jax.lax.dot_general(
        lhs, rhs, dims, precision, preferred_element_type
      )
      calls.append((lhs.dtype, preferred_element_type, out.dtype))
      return out

    x = _x(dtype=jnp.bfloat16)
    layer = fl.SwiGLU(H, activations_in_float32=True, dot_general=spy)
    v = layer.init(_key(), x)
    calls.clear()
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
    assert calls == [(bf16, f32, f32), (bf16, f32, f32), (bf16, None, bf16)]
    # The reference: float32 pre-activations, hidden rounded once.
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _p(v))
    g = jnp.matmul(x, p['gate_proj']['kernel'], preferred_element_type=f32)
    u = jnp.matmul(x, p['up_proj']['kernel'], preferred_element_type=f32)
    h = flaxact.gated_product(g, u, 'silu').astype(jnp.bfloat16)
    chex.assert_trees_all_equal(y, h @ p['down_proj']['kernel'])


class TestOptions:
  @pytest.mark.parametrize('fused,n', [(False, 3), (True, 2)])
  def test_dot_general_is_used_by_every_projection(self, fused, n):
    calls = []

    def spy(lhs, rhs, dims, precision=None, preferred_element_type=None):
      calls.append(rhs.shape)
      return 2 * jax.lax.dot_general(lhs, rhs, dims, precision)

    x = _x()
    plain = fl.SwiGLU(H, fused_gate_up=fused)
    v = plain.init(_key(), x)
    y = fl.SwiGLU(H, fused_gate_up=fused, dot_general=spy).apply(v, x)
    assert len(calls) == n
    # gate, up and down all doubled: silu(2g) * 2u doubled again.
    p = _p(v)
    if fused:
      p['gate_proj'] = {'kernel': p['gate_up_proj']['kernel'][:, 0]}
      p['up_proj'] = {'kernel': p['gate_up_proj']['kernel'][:, 1]}
      del p['gate_up_proj']
    p2 = {k: {'kernel': 2 * p[k]['kernel']} for k in p}
    ref = _ref_gated(p2, x, 'silu')
    chex.assert_trees_all_close(y, ref.astype(np.float32), **MATMUL_TOL)

  @pytest.mark.parametrize('remat', [True, False])
  def test_checkpoint_names_are_in_the_jaxpr(self, remat):
    x = _x()
    for layer, names in (
      (fl.SwiGLU(H, remat=remat), set(CHECKPOINT_NAMES)),
      (fl.FFN(H, remat=remat), {'ffn_up', 'ffn_hidden', 'ffn_out'}),
    ):
      v = layer.init(_key(), x)
      jaxpr = jax.make_jaxpr(layer.apply)(v, x).jaxpr
      assert checkpoint_names(jaxpr) == names

  def test_user_policy_can_save_hidden_by_name(self):
    x = _x()
    layer = fl.SwiGLU(H, remat=False)
    v = layer.init(_key(), x)
    policy = jax.checkpoint_policies.save_only_these_names('ffn_hidden')
    f = jax.checkpoint(lambda v, x: layer.apply(v, x).sum(), policy=policy)
    hidden = residuals_of_shape(f, (v, x), (T, H))
    assert len(hidden) == 1
    assert "named 'ffn_hidden'" in hidden[0]

  def test_learnable_activation_params_live_in_layer(self):
    layer = fl.GatedFFN(H, activation=fl.PReLU(H))
    v = layer.init(_key(), _x())
    assert jnp.shape(nn.unbox(v)['params']['activation']['negative_slope']) == (
      H,
    )
