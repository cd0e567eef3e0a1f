"""The Linen and NNX ``MoE`` layers: values, gradients, dtypes, errors, memory.

Every case of ``tests/moe_layer_helpers.CASES`` is checked against the
float64 per-token reference, and the Linen layer given the NNX layer's
weights must return exactly the same output and record exactly the same
auxiliary values.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.moe import dispatch
from tests import moe_layer_helpers as mh
from tests.helpers import GRAD_TOL, TOL
from tests.layer_helpers import residuals_of_shape

# A routed layer sums k expert outputs, each a matmul over d then over h, of
# float32 values of size ~10: float32 rounding reaches a few 1e-6 absolute.
REF_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _nnx_apply(layer, x):
  """``(y, recorded)`` of the NNX layer under ``nnx.capture``, jitted."""

  @nnx.jit
  def f(layer, x):
    y, aux = nnx.capture(layer, nnx.Intermediate)(x)
    return y, dict(nnx.to_pure_dict(aux))

  return f(layer, x)


def _linen_apply(layer, variables, x):
  y, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=['intermediates']))(
    variables, x
  )
  return y, dict(state['intermediates'])


@pytest.mark.parametrize('case', sorted(mh.CASES))
def test_matches_reference_and_linen_equals_nnx(case):
  layer = mh.nnx_layer(case)
  variables = mh.variables_of(layer)
  x = mh.x_input()
  y, recorded = _nnx_apply(layer, x)
  want = mh.reference(case, variables, x)
  chex.assert_trees_all_close(np.asarray(y, np.float64), want, **REF_TOL)
  linen = mh.linen_layer(case)
  shapes = jax.eval_shape(linen.init, jax.random.key(0), x)
  assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(variables)
  y_linen, recorded_linen = _linen_apply(linen, variables, x)
  np.testing.assert_array_equal(y_linen, y)
  assert sorted(recorded) == sorted(recorded_linen)
  for name, value in recorded.items():
    np.testing.assert_array_equal(recorded_linen[name], value)


def test_recorded_values_are_the_routing_functions():
  layer = mh.nnx_layer('sigmoid_scaled')
  x = mh.x_input()
  _, recorded = _nnx_apply(layer, x)
  logits = x @ layer.router.kernel[...]
  _, experts = flaxact.top_k_routing(
    logits,
    mh.K,
    router='sigmoid',
    score_correction_bias=layer.score_correction_bias[...],
  )
  (lb,), (z,), (load,) = (
    recorded[k] for k in ('load_balancing_loss', 'router_z_loss', 'expert_load')
  )
  np.testing.assert_allclose(
    lb, flaxact.load_balancing_loss(logits, experts, mh.E), rtol=1e-6
  )
  np.testing.assert_allclose(z, flaxact.router_z_loss(logits), rtol=1e-6)
  np.testing.assert_array_equal(
    load, np.bincount(np.asarray(experts).ravel(), minlength=mh.E)
  )
  assert load.sum() == mh.T * mh.K


def test_every_impl_gives_the_same_layer_output():
  x = mh.x_input()
  outs = {}
  layer = mh.nnx_layer('gpt_oss', capacity_factor=0.75)
  for impl in ('loop', 'tiles', 'ragged', 'dense'):
    layer.impl = impl
    outs[impl] = _nnx_apply(layer, x)[0]
  for impl in ('tiles', 'ragged', 'dense'):
    chex.assert_trees_all_close(
      outs[impl], outs['loop'], **TOL[np.dtype(jnp.float32)]
    )


def test_check_grads_inputs_and_weights():
  # Float64 so finite differences resolve the gradients (GRAD_TOL float64);
  # the routing is piecewise constant and no step crosses a routing tie.
  # GPT-OSS product with expert and router biases, plus a gated shared expert.
  kw = dict(
    shared_hidden_features=mh.SHARED_H,
    shared_expert_gate=True,
    param_dtype=jnp.float64,
  )
  with jax.enable_x64(True):
    layer = mh.nnx_layer('gpt_oss', **kw)
    variables = mh.variables_of(layer)
    linen = mh.linen_layer('gpt_oss', **kw)
    x = mh.x_input(jnp.float64, t=6)

    def f(x, params):
      return linen.apply({**variables, 'params': params}, x)

    check_grads(
      jax.jit(f),
      (x, variables['params']),
      order=1,
      modes=('rev',),
      eps=1e-6,
      **GRAD_TOL[np.dtype(jnp.float64)],
    )


def test_jit_grad_vmap():
  layer = mh.nnx_layer('shared')
  graphdef, state = nnx.split(layer)
  x = mh.x_input()

  def f(state, x):
    return nnx.merge(graphdef, state)(x)

  y = jax.jit(f)(state, x)
  chex.assert_trees_all_close(y, _nnx_apply(layer, x)[0], **REF_TOL)
  per_row = jax.jit(jax.vmap(f, in_axes=(None, 0)))(state, x[:, None, :])
  chex.assert_trees_all_close(per_row[:, 0], y, **REF_TOL)
  grads = jax.jit(jax.grad(lambda s, x: jnp.sum(f(s, x) ** 2)))(state, x)
  kernels = nnx.to_pure_dict(grads)
  for name in ('router', 'gate_proj', 'up_proj', 'down_proj', 'shared_expert'):
    assert any(
      np.any(np.asarray(a) != 0) for a in jax.tree.leaves(kernels[name])
    )


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_dtype_preserved(dtype):
  layer = mh.nnx_layer('shared_gate')
  x = mh.x_input()
  y32 = _nnx_apply(layer, x)[0]
  y, _ = _nnx_apply(layer, x.astype(dtype))
  assert y.dtype == dtype
  # one rounding of x, the weights and every product: a few ulps of ~10
  chex.assert_trees_all_close(
    y.astype(jnp.float32),
    y32,
    rtol=4 * TOL[np.dtype(dtype)]['rtol'],
    atol=0.1,
  )
  linen = mh.linen_layer('shared_gate', dtype=dtype)
  y_linen, _ = _linen_apply(linen, mh.variables_of(layer), x)
  assert y_linen.dtype == dtype


@pytest.mark.parametrize('impl', ['loop', 'tiles', 'ragged'])
def test_backward_keeps_two_hidden_sized_arrays(impl):
  layer = mh.nnx_layer('softmax', impl=impl, tile_size=8)
  graphdef, state = nnx.split(layer)
  x = mh.x_input()

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))

  tile = 1 if impl == 'ragged' else 8
  rows = dispatch.num_rows(mh.T * mh.K, mh.E, tile, None)
  saved = residuals_of_shape(loss, (state, x), (rows, mh.H))
  assert len(saved) == 2, saved
  for shape in ((mh.T, mh.K, mh.H), (mh.T * mh.K, mh.H)):
    if shape[0] != rows:
      assert not residuals_of_shape(loss, (state, x), shape)


def test_dense_backward_keeps_two_pre_activations():
  layer = mh.nnx_layer('softmax', impl='dense')
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))

  args = (state, mh.x_input())
  saved = residuals_of_shape(loss, args, (mh.E, mh.T, mh.H))
  assert len(saved) == 2, saved


def test_errors_same_type_in_linen_and_nnx():
  bad = [
    (dict(experts_per_token=0), ValueError, 'experts_per_token'),
    (dict(experts_per_token=5), ValueError, 'experts_per_token'),
    (dict(router='softmaxx'), ValueError, "'softmax'"),
    (
      dict(router='sigmoid', num_groups=3, groups_per_token=1),
      ValueError,
      'num_groups',
    ),
    (dict(capacity_factor=0.0), ValueError, 'capacity_factor'),
    (dict(capacity_factor=-1.0), ValueError, 'capacity_factor'),
    (dict(impl='fast'), ValueError, 'impl'),
    (dict(shared_expert_gate=True), ValueError, 'shared_hidden_features'),
    (dict(activation=fx.PReLU()), TypeError, 'stateless'),
  ]
  for kw, error, text in bad:
    args = {'experts_per_token': 2, **kw}
    k = args.pop('experts_per_token')
    with pytest.raises(error, match=text):
      fx.MoE(mh.D, mh.H, mh.E, k, rngs=nnx.Rngs(0), **args)
    if 'activation' in kw:
      args['activation'] = fl.PReLU()
    with pytest.raises(error, match=text):
      fl.MoE(mh.H, mh.E, k, **args)


def test_input_errors_same_type_in_linen_and_nnx():
  # abstract weights: the checks run before any computation
  layer = nnx.eval_shape(lambda: fx.MoE(mh.D, mh.H, mh.E, 2, rngs=nnx.Rngs(0)))
  linen = fl.MoE(mh.H, mh.E, 2)
  variables = jax.eval_shape(linen.init, jax.random.key(0), mh.x_input())
  wrong = jnp.ones((3, mh.D + 1))
  with pytest.raises(
    ValueError, match=rf'\(\.\.\., {mh.D}\).*last dimension {mh.D + 1}'
  ):
    layer(wrong)
  with pytest.raises(
    ValueError, match=rf'\(\.\.\., {mh.D}\).*last dimension {mh.D + 1}'
  ):
    linen.apply(variables, wrong)
  ints = jnp.ones((3, mh.D), jnp.int32)
  with pytest.raises(TypeError, match='got dtype int32'):
    layer(ints)
  with pytest.raises(TypeError, match='got dtype int32'):
    linen.apply(variables, ints)


def test_score_correction_bias_is_not_trained():
  layer = mh.nnx_layer('sigmoid_scaled')
  assert isinstance(layer.score_correction_bias, nnx.BatchStat)
  assert 'score_correction_bias' not in nnx.to_pure_dict(
    nnx.state(layer, nnx.Param)
  )
  variables = jax.eval_shape(
    fl.MoE(mh.H, mh.E, 2, router='sigmoid').init,
    jax.random.key(0),
    mh.x_input(),
  )
  assert 'score_correction_bias' not in variables['params']
  assert variables['batch_stats']['score_correction_bias'].shape == (mh.E,)


def test_repr_is_readable():
  text = repr(fl.MoE(32, 8, 2, router='sigmoid'))
  assert text.startswith(
    'MoE(hidden_features=32, num_experts=8, experts_per_token=2,'
    " activation='silu', out_features=None"
  )
  assert 'dropout' not in text and 'activations_in_float32' not in text
  text = repr(nnx.eval_shape(lambda: fx.MoE(16, 32, 8, 2, rngs=nnx.Rngs(0))))
  assert "activation='silu'" in text and 'dropout' not in text


def test_lowers_for_tpu_and_cuda():
  """Forward and backward of every impl lower for TPU and GPU from CPU."""
  x = mh.x_input()
  layer = mh.nnx_layer('gpt_oss', shared_hidden_features=8)
  for impl in ('loop', 'tiles', 'ragged', 'dense'):
    layer.impl = impl
    graphdef, state = nnx.split(layer)

    def loss(state, x, graphdef=graphdef):
      return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(state, x)
    for platform in ('tpu', 'cuda'):
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      assert 'func.func public @main' in text, (impl, platform)
