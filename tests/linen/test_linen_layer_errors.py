"""Tests of the Linen FFN layers: dropout, error messages and repr."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxact
from flaxact import linen as fl
from tests.helpers import tol

D, H, T = 12, 20, 6


def _x(shape=(T, D), dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _key(seed=0):
  return jax.random.key(seed)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


class TestDropout:
  def _identity_ffn(self, **kw):
    # up = down = identity, no activation: the output is dropout(x).
    layer = fl.FFN(D, activation='identity', use_bias=False, **kw)
    eye = jnp.eye(D)
    v = {'params': {'up_proj': {'kernel': eye}, 'down_proj': {'kernel': eye}}}
    return layer, v

  def test_deterministic_is_identity_and_training_drops(self):
    layer, v = self._identity_ffn(dropout_rate=0.5)
    x = jnp.ones((400, D))
    chex.assert_trees_all_equal(layer.apply(v, x, deterministic=True), x)
    y = layer.apply(v, x, deterministic=False, rngs={'dropout': _key(3)})
    vals = np.unique(np.asarray(y))
    np.testing.assert_array_equal(vals, [0.0, 2.0])
    assert abs(np.mean(np.asarray(y) == 0) - 0.5) < 0.03
    y2 = layer.apply(v, x, deterministic=False, rngs={'dropout': _key(3)})
    chex.assert_trees_all_equal(y, y2)

  def test_broadcast_dims_share_the_mask(self):
    layer, v = self._identity_ffn(dropout_rate=0.5, dropout_broadcast_dims=(0,))
    y = layer.apply(
      v, jnp.ones((8, D)), deterministic=False, rngs={'dropout': _key(4)}
    )
    y = np.asarray(y)
    assert (y == y[:1]).all() and (y == 0).any()

  def test_deterministic_from_the_constructor(self):
    layer, v = self._identity_ffn(dropout_rate=0.5, deterministic=True)
    x = jnp.ones((4, D))
    chex.assert_trees_all_equal(layer.apply(v, x), x)

  def test_dropout_in_remat_gradient(self):
    x = _x()
    layer = fl.SwiGLU(H, dropout_rate=0.3)
    v = layer.init(_key(), x, deterministic=True)
    rngs = {'dropout': _key(5)}

    def loss(layer):
      return lambda v: layer.apply(v, x, deterministic=False, rngs=rngs).sum()

    plain = fl.SwiGLU(H, dropout_rate=0.3, remat=False)
    chex.assert_trees_all_close(
      jax.grad(loss(layer))(v), jax.grad(loss(plain))(v), **tol(jnp.float32)
    )


class TestErrors:
  def test_training_dropout_without_rng(self):
    layer = fl.SwiGLU(H, dropout_rate=0.1)
    v = layer.init(_key(), _x(), deterministic=True)
    with pytest.raises(ValueError, match=r"needs a 'dropout' rng.*got none"):
      layer.apply(v, _x(), deterministic=False)

  def test_dropout_without_deterministic(self):
    layer = fl.SwiGLU(H, dropout_rate=0.1)
    with pytest.raises(ValueError, match='needs deterministic=True'):
      layer.init(_key(), _x())

  def test_unknown_activation_name(self):
    with pytest.raises(
      ValueError, match=r"GatedFFN: unknown activation 'silu_x'.*Valid names"
    ):
      fl.GatedFFN(H, activation='silu_x')

  def test_split_form_activation_name(self):
    with pytest.raises(ValueError, match='element-wise; got the split-form'):
      fl.FFN(H, activation='swiglu')

  @pytest.mark.parametrize(
    'cls, fixed', [(fl.SwiGLU, 'silu'), (fl.GeGLU, 'gelu'), (fl.ReGLU, 'relu')]
  )
  def test_fixed_activation(self, cls, fixed):
    # The same exception type as the NNX presets (TypeError).
    with pytest.raises(TypeError, match=f"fixes activation='{fixed}'"):
      cls(H, activation='tanh')

  def test_activation_not_callable(self):
    with pytest.raises(TypeError, match='registry name or a callable; got 3'):
      fl.FFN(H, activation=3)  # type: ignore[arg-type]

  @pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_])
  def test_non_float_input(self, dtype):
    with pytest.raises(TypeError, match=r'floating-point input.*got dtype'):
      fl.SwiGLU(H).init(_key(), jnp.ones((2, D), dtype))

  @pytest.mark.parametrize('bad', [0, -4, 2.5, True])
  def test_bad_hidden_features(self, bad):
    with pytest.raises(ValueError, match='hidden_features must be a positive'):
      fl.SwiGLU(bad)

  @pytest.mark.parametrize('bad', [-0.1, 1.5, 'x'])
  def test_bad_dropout_rate(self, bad):
    with pytest.raises(ValueError, match='dropout_rate must be'):
      fl.SwiGLU(H, dropout_rate=bad)

  def test_wrong_feature_size_after_init(self):
    layer = fl.SwiGLU(H)
    v = layer.init(_key(), _x())
    with pytest.raises(
      ValueError,
      match=r'SwiGLU: expected input of shape \(\.\.\., 12\).*got shape'
      r' \(2, 7\)',
    ):
      layer.apply(v, _x((2, 7)))

  def test_wrong_feature_size_after_init_fused_and_ffn(self):
    for layer in (fl.GatedFFN(H, fused_gate_up=True), fl.FFN(H)):
      v = layer.init(_key(), _x())
      with pytest.raises(ValueError, match=r'expected input of shape'):
        layer.apply(v, _x((2, 7)))


class TestRepr:
  def test_activation_by_name_and_no_dropout_noise(self):
    text = repr(fl.GatedFFN(H, activation=flaxact.gelu_tanh))
    assert text.startswith('GatedFFN(hidden_features=20, out_features=None,')
    assert "activation='gelu_tanh'" in text
    assert '<function' not in text
    assert 'deterministic' not in text
    assert 'dropout_broadcast_dims' not in text

  def test_dropout_options_shown_when_used(self):
    text = repr(fl.FFN(H, dropout_rate=0.1, deterministic=True))
    assert 'dropout_rate=0.1' in text
    assert 'deterministic=True' in text
    assert "activation='gelu'" in text

  def test_partial_activation(self):
    act = flaxact.get_activation('leaky_relu', negative_slope=0.2)
    assert "'leaky_relu'(negative_slope=0.2)" in repr(fl.FFN(H, activation=act))
