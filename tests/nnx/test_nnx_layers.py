"""Tests of the NNX FFN layers, and Linen-NNX agreement given equal weights."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.layers.remat import CHECKPOINT_NAMES
from tests.helpers import tol
from tests.layer_helpers import checkpoint_names, residuals_of_shape

D, H, T = 12, 20, 6
P = jax.sharding.PartitionSpec


def _x(shape=(T, D), dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _copy_linen_into_nnx(variables, layer) -> None:
  """Writes Linen params (plus 0.1, so biases are non-zero) into ``layer``."""
  params = nn.unbox(variables)['params']
  for name, sub in params.items():
    target = getattr(layer, name)
    for leaf, value in sub.items():
      getattr(target, leaf)[...] = value


# (Linen layer, NNX layer) pairs built with the same options.
_PAIRS = {
  'swiglu': lambda **kw: (fl.SwiGLU(H, **kw), fx.SwiGLU(D, H, **_r(kw))),
  'geglu': lambda **kw: (fl.GeGLU(H, 5, **kw), fx.GeGLU(D, H, 5, **_r(kw))),
  'reglu': lambda **kw: (fl.ReGLU(H, **kw), fx.ReGLU(D, H, **_r(kw))),
  'gated_gelu_tanh': lambda **kw: (
    fl.GatedFFN(H, activation='gelu_tanh', **kw),
    fx.GatedFFN(D, H, activation='gelu_tanh', **_r(kw)),
  ),
  'ffn': lambda **kw: (fl.FFN(H, **kw), fx.FFN(D, H, **_r(kw))),
}


def _r(kw):
  return {**kw, 'rngs': nnx.Rngs(0)}


class TestLinenConsistency:
  @pytest.mark.parametrize(
    'kind,options',
    [(kind, {}) for kind in sorted(_PAIRS)]
    + [
      ('swiglu', {'use_bias': True}),
      ('swiglu', {'remat': False}),
      ('swiglu', {'dtype': jnp.bfloat16}),
      ('swiglu', {'activations_in_float32': True, 'dtype': jnp.bfloat16}),
      ('ffn', {'use_bias': True, 'remat': False}),
      ('ffn', {'activations_in_float32': True, 'dtype': jnp.bfloat16}),
    ],
  )
  def test_outputs_and_grads_exactly_equal(self, kind, options):
    linen_layer, nnx_layer = _PAIRS[kind](**options)
    x = _x()
    variables = linen_layer.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.1, nn.unbox(variables))
    _copy_linen_into_nnx(variables, nnx_layer)

    y_linen = jax.jit(linen_layer.apply)(variables, x)
    y_nnx = nnx.jit(lambda m, x: m(x))(nnx_layer, x)
    chex.assert_trees_all_equal(y_linen, y_nnx)
    chex.assert_trees_all_equal(linen_layer.apply(variables, x), nnx_layer(x))

    def loss_linen(v, x):
      return jnp.sum(jnp.sin(linen_layer.apply(v, x).astype(jnp.float32)))

    def loss_nnx(m, x):
      return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))

    gx_linen = jax.jit(jax.grad(loss_linen, argnums=1))(variables, x)
    gx_nnx = nnx.jit(nnx.grad(loss_nnx, argnums=1))(nnx_layer, x)
    chex.assert_trees_all_equal(gx_linen, gx_nnx)

  def test_fused_exactly_equal(self):
    linen_layer = fl.SwiGLU(H, use_bias=True, fused_gate_up=True)
    nnx_layer = fx.SwiGLU(
      D, H, use_bias=True, fused_gate_up=True, rngs=nnx.Rngs(0)
    )
    x = _x()
    variables = jax.tree.map(
      lambda a: a + 0.1, nn.unbox(linen_layer.init(jax.random.key(0), x))
    )
    _copy_linen_into_nnx(variables, nnx_layer)
    chex.assert_trees_all_equal(linen_layer.apply(variables, x), nnx_layer(x))

  def test_learnable_activation_exactly_equal(self):
    linen_layer = fl.GatedFFN(H, activation=fl.Swish(H))
    nnx_layer = fx.GatedFFN(D, H, activation=fx.Swish(H), rngs=nnx.Rngs(0))
    x = _x()
    variables = jax.tree.map(
      lambda a: a + 0.1, nn.unbox(linen_layer.init(jax.random.key(0), x))
    )
    _copy_linen_into_nnx(variables, nnx_layer)
    chex.assert_trees_all_equal(linen_layer.apply(variables, x), nnx_layer(x))


class TestStructure:
  def test_attributes_and_metadata(self):
    layer = fx.SwiGLU(D, H, use_bias=True, rngs=nnx.Rngs(0))
    assert layer.gate_up_proj is None
    for name, kshape, kaxes, baxes in (
      ('gate_proj', (D, H), ('embed', 'mlp'), ('mlp',)),
      ('up_proj', (D, H), ('embed', 'mlp'), ('mlp',)),
      ('down_proj', (H, D), ('mlp', 'embed'), ('embed',)),
    ):
      proj = getattr(layer, name)
      assert isinstance(proj.kernel, nnx.Param)
      assert proj.kernel.shape == kshape
      assert proj.kernel.get_metadata()['out_sharding'] == kaxes
      assert proj.bias.get_metadata()['out_sharding'] == baxes
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert specs['gate_proj']['kernel'].get_value() == P('embed', 'mlp')

  def test_gated_has_no_bias_by_default_ffn_has(self):
    gated = fx.GatedFFN(D, H, rngs=nnx.Rngs(0))
    assert gated.gate_proj.bias is None and gated.down_proj.bias is None
    ffn = fx.FFN(D, H, rngs=nnx.Rngs(0))
    assert ffn.up_proj.bias.shape == (H,)

  def test_fused_attributes(self):
    layer = fx.SwiGLU(D, H, fused_gate_up=True, rngs=nnx.Rngs(0))
    assert layer.gate_proj is None and layer.up_proj is None
    assert layer.gate_up_proj.kernel.shape == (D, 2, H)
    assert layer.gate_up_proj.kernel.get_metadata()['out_sharding'] == (
      'embed',
      None,
      'mlp',
    )

  def test_out_features(self):
    layer = fx.GeGLU(D, H, 3, rngs=nnx.Rngs(0))
    assert layer(_x()).shape == (T, 3)
    assert layer.down_proj.kernel.shape == (H, 3)

  def test_projection_callable_on_its_own(self):
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    x = _x()
    chex.assert_trees_all_close(
      layer.gate_proj(x), x @ layer.gate_proj.kernel[...], **tol(jnp.float32)
    )

  @pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
  def test_output_dtype_is_input_dtype(self, dtype):
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    y = layer(_x(dtype=dtype))
    assert y.dtype == dtype
    chex.assert_trees_all_close(
      y.astype(jnp.float32), layer(_x()), **tol(dtype)
    )


class TestTransforms:
  def test_memory_lean_residuals(self):
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = _x()

    def loss(state, x):
      return nnx.merge(graphdef, state)(x).sum()

    hidden = residuals_of_shape(loss, (state, x), (T, H))
    assert len(hidden) == 2, hidden
    assert {"named 'ffn_gate'", "named 'ffn_up'"} == {
      ' '.join(r.split(' ')[1:3]) for r in hidden
    }

  def test_closure_under_jax_transforms(self):
    # The layer can be closed over by plain jax.jit / jax.jvp / jax.grad.
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    x = _x()
    y = jax.jit(lambda x: layer(x))(x)
    _, t = jax.jvp(layer, (x,), (jnp.ones_like(x),))
    g = jax.grad(lambda x: layer(x).sum())(x)
    chex.assert_trees_all_close(y, layer(x), **tol(jnp.float32))
    chex.assert_trees_all_close(
      t.sum(), jnp.sum(g), rtol=1e-5, atol=1e-5
    )  # <1, J 1> == <J^T 1, 1>: two sums of T*D float32 terms

  def test_checkpoint_names(self):
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, _x()
    ).jaxpr
    assert checkpoint_names(jaxpr) == set(CHECKPOINT_NAMES)

  def test_dot_general_hook(self):
    calls = []

    def spy(lhs, rhs, dims, precision=None, preferred_element_type=None):
      calls.append(rhs.shape)
      return jax.lax.dot_general(lhs, rhs, dims, precision)

    layer = fx.SwiGLU(D, H, dot_general=spy, rngs=nnx.Rngs(0))
    plain = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(layer(_x()), plain(_x()))
    assert sorted(calls) == sorted([(D, H), (D, H), (H, D)])


class TestDropout:
  def _identity_ffn(self, **kw):
    layer = fx.FFN(D, D, activation='identity', use_bias=False, **kw)
    layer.up_proj.kernel[...] = jnp.eye(D)
    layer.down_proj.kernel[...] = jnp.eye(D)
    return layer

  def test_rngs_from_the_constructor(self):
    layer = self._identity_ffn(dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((400, D))
    y1, y2 = np.asarray(layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(np.unique(y1), [0.0, 2.0])
    assert abs(np.mean(y1 == 0) - 0.5) < 0.03
    assert not np.array_equal(y1, y2)  # the stream advances

  def test_rngs_at_call_and_eval(self):
    layer = self._identity_ffn(dropout_rate=0.5, rngs=nnx.Rngs(params=0))
    x = jnp.ones((8, D))
    y = layer(x, rngs=nnx.Rngs(dropout=3))
    assert (np.asarray(y) == 0).any()
    chex.assert_trees_all_equal(layer(x, deterministic=True), x)
    layer.eval()
    chex.assert_trees_all_equal(layer(x), x)

  def test_broadcast_dims(self):
    layer = self._identity_ffn(
      dropout_rate=0.5, dropout_broadcast_dims=(0,), rngs=nnx.Rngs(0)
    )
    y = np.asarray(layer(jnp.ones((8, D))))
    assert (y == y[:1]).all() and (y == 0).any()


class TestErrors:
  def test_wrong_input_feature_size(self):
    layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
    with pytest.raises(
      ValueError,
      match=r'SwiGLU: expected input of shape \(\.\.\., 12\).*got shape'
      r' \(6, 7\)',
    ):
      layer(_x((T, 7)))

  @pytest.mark.parametrize('dtype', [jnp.int32, jnp.uint8])
  def test_non_float_input(self, dtype):
    layer = fx.FFN(D, H, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r'FFN: expected a floating-point'):
      layer(jnp.ones((2, D), dtype))

  def test_training_dropout_without_rng(self):
    layer = fx.SwiGLU(D, H, dropout_rate=0.1, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r'needs an rng.*got no rngs at'):
      layer(_x())
    with pytest.raises(ValueError, match=r"got an nnx.Rngs without a 'drop"):
      layer(_x(), rngs=nnx.Rngs(params=1))

  def test_unknown_activation_name(self):
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
      fx.FFN(D, H, activation='gelu2', rngs=nnx.Rngs(0))

  @pytest.mark.parametrize('cls', [fx.SwiGLU, fx.GeGLU, fx.ReGLU])
  def test_fixed_activation(self, cls):
    # The same exception type as the Linen presets (TypeError): the presets'
    # signatures have no activation argument.
    with pytest.raises(TypeError, match="unexpected keyword argument 'act"):
      cls(D, H, activation='tanh', rngs=nnx.Rngs(0))  # type: ignore[call-arg]

  @pytest.mark.parametrize('arg', ['in_features', 'hidden_features'])
  def test_bad_features(self, arg):
    kw = {'in_features': D, 'hidden_features': H, arg: 0}
    with pytest.raises(ValueError, match=f'{arg} must be a positive integer'):
      fx.GatedFFN(**kw, rngs=nnx.Rngs(0))


class TestRepr:
  def test_activation_by_name_and_no_dropout_noise(self):
    text = repr(fx.GatedFFN(D, H, activation='gelu_new', rngs=nnx.Rngs(0)))
    assert "activation='gelu_tanh'" in text
    assert '<function' not in text
    assert 'deterministic' not in text
    assert 'dropout_broadcast_dims' not in text

  def test_dropout_options_shown_when_used(self):
    text = repr(fx.FFN(D, H, dropout_rate=0.1, rngs=nnx.Rngs(0)))
    assert 'dropout_rate=0.1' in text
    assert 'deterministic=False' in text
    assert "activation='gelu'" in text

  def test_learnable_activation_keeps_its_module_repr(self):
    layer = fx.GatedFFN(D, H, activation=fx.PReLU(), rngs=nnx.Rngs(0))
    assert 'activation=PReLU(' in repr(layer)
