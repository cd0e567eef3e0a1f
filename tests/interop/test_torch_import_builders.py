"""``from_torch`` in Linen and NNX against real ``transformers`` modules:
outputs and input gradients, layer classes, options, dropout and training."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.interop.torch.state_dict import parse_state_dict
from tests import helpers
from tests.torch_helpers import CASE_NAMES, REFERENCE, FakeTensor, kwargs

GATED_CASES = [n for n in CASE_NAMES if parse_state_dict(
  REFERENCE[n]['sd'], layout=REFERENCE[n]['layout']).gated]  # fmt: skip


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _linen_apply(layer, variables, x):
  return np.asarray(layer.apply(variables, jnp.asarray(x)))


def _nnx_apply(layer, x):
  return np.asarray(layer(jnp.asarray(x)))


@pytest.mark.parametrize('name', CASE_NAMES)
def test_linen_matches_torch_outputs_and_input_gradients(name):
  case = REFERENCE[name]
  layer, variables = fl.from_torch(case['sd'], **kwargs(case))
  y, vjp = jax.vjp(lambda x: layer.apply(variables, x), jnp.asarray(case['x']))
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))
  (gx,) = vjp(jnp.asarray(case['ct']))
  # 1e-5: the input gradient sums two more roundings per element than y.
  np.testing.assert_allclose(gx, case['gx'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', CASE_NAMES)
def test_nnx_matches_torch_and_linen_exactly(name):
  case = REFERENCE[name]
  layer = fx.from_torch(case['sd'], **kwargs(case))
  y = _nnx_apply(layer, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))
  linen_layer, variables = fl.from_torch(case['sd'], **kwargs(case))
  np.testing.assert_array_equal(
    _linen_apply(linen_layer, variables, case['x']), y
  )
  gx = nnx.grad(lambda x: jnp.sum(layer(x) * case['ct']))(
    jnp.asarray(case['x'])
  )
  np.testing.assert_allclose(gx, case['gx'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', GATED_CASES)
def test_fused_gate_up_matches_torch(name):
  # The fused (in, 2, hidden) matmul rounds differently from two (in, hidden)
  # ones on XLA:CPU (by about 1 ulp), so it is held to the torch reference
  # within TOL, and Linen and NNX agree exactly with each other.
  case = REFERENCE[name]
  layer, variables = fl.from_torch(
    case['sd'], fused_gate_up=True, **kwargs(case)
  )
  assert set(variables['params']) == {'gate_up_proj', 'down_proj'}
  y = _linen_apply(layer, variables, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))
  nnx_layer = fx.from_torch(case['sd'], fused_gate_up=True, **kwargs(case))
  assert nnx_layer.gate_proj is None and nnx_layer.up_proj is None
  np.testing.assert_array_equal(_nnx_apply(nnx_layer, case['x']), y)


@pytest.mark.parametrize(
  'name, gated',
  [('llama', True), ('gemma', True), ('t5', False), ('t5_gated', True),
   ('gpt2', False), ('starcoder2', False), ('bert', False), ('phi3', True)],
)  # fmt: skip
def test_layer_classes_and_weights(name, gated):
  case = REFERENCE[name]
  ffn = parse_state_dict(case['sd'], layout=case['layout'])
  layer, variables = fl.from_torch(case['sd'], layout=case['layout'])
  assert type(layer) is (fl.GatedFFN if gated else fl.FFN)
  assert layer.activation == ffn.activation
  assert layer.use_bias is ffn.use_bias
  assert layer.hidden_features == ffn.hidden_features
  # The same tree as layer.init's, logical-axis boxes included.
  init = layer.init(jax.random.key(0), jnp.asarray(case['x']))
  assert jax.tree.structure(variables) == jax.tree.structure(init)
  assert nn.get_partition_spec(variables) == nn.get_partition_spec(init)
  chex.assert_trees_all_equal(nn.unbox(variables)['params'], ffn.params())
  nnx_layer = fx.from_torch(case['sd'], layout=case['layout'])
  assert type(nnx_layer) is (fx.GatedFFN if gated else fx.FFN)
  state = nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))
  chex.assert_trees_all_equal(state, ffn.params())


def test_prefix_and_strict_reach_the_builders():
  sd = REFERENCE['llama']['sd']
  full = {f'model.layers.3.mlp.{k}': v for k, v in sd.items()}
  full['model.layers.3.input_layernorm.weight'] = np.ones(8, np.float32)
  x = REFERENCE['llama']['x']
  layer, variables = fl.from_torch(
    full, layout='llama', prefix='model.layers.3.mlp'
  )
  want = _linen_apply(*fl.from_torch(sd, layout='llama'), x)
  np.testing.assert_array_equal(_linen_apply(layer, variables, x), want)
  extra = {**sd, 'act.weight': np.ones(1, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'act\.weight'"):
    fx.from_torch(extra, layout='llama')
  nnx_layer = fx.from_torch(extra, layout='llama', strict=False)
  np.testing.assert_array_equal(_nnx_apply(nnx_layer, x), want)


def test_layer_options_are_passed_on():
  case = REFERENCE['t5_gated']
  x = jnp.asarray(case['x'])
  layer, variables = fl.from_torch(
    case['sd'], layout='t5_gated', dtype=jnp.bfloat16
  )
  assert layer.apply(variables, x).dtype == jnp.bfloat16
  nnx_layer = fx.from_torch(
    case['sd'], layout='t5_gated', remat=False, dtype=jnp.bfloat16
  )
  assert nnx_layer.remat is False
  assert nnx_layer(x).dtype == jnp.bfloat16


def test_dropout_in_linen():
  case = REFERENCE['gpt2']
  x = jnp.asarray(case['x'])
  layer, variables = fl.from_torch(case['sd'], layout='gpt2', dropout_rate=0.5)
  y_eval = layer.apply(variables, x, deterministic=True)
  np.testing.assert_allclose(y_eval, case['y'], **helpers.tol(jnp.float32))
  y_train = layer.apply(
    variables, x, deterministic=False, rngs={'dropout': jax.random.key(1)}
  )
  assert not np.allclose(y_train, y_eval)


def test_nnx_layer_with_dropout_trains_as_loaded():
  """rngs= gives the loaded layer its dropout stream: an optax step runs,
  masks differ between steps, and only the loaded weights change."""
  case = REFERENCE['starcoder2']
  x, target = jnp.asarray(case['x']), jnp.asarray(case['y']) * 0.5
  layer = fx.from_torch(
    case['sd'], layout='starcoder2', dropout_rate=0.25, rngs=nnx.Rngs(0)
  )
  before = nnx.to_pure_dict(nnx.clone(nnx.state(layer, nnx.Param)))
  optimizer = nnx.Optimizer(layer, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(layer, optimizer):
    def loss_fn(layer):
      return jnp.mean((layer(x) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(layer)
    optimizer.update(layer, grads)
    return loss

  losses = [float(step(layer, optimizer)) for _ in range(3)]
  assert all(np.isfinite(losses))
  after = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for old, new in zip(
    jax.tree.leaves(before), jax.tree.leaves(after), strict=True
  ):
    assert not np.array_equal(old, new)
  a, b = layer(x), layer(x)  # training mode: two different masks
  assert not np.array_equal(a, b)
  layer.eval()
  np.testing.assert_array_equal(layer(x), layer(x))


def test_nnx_dropout_without_rngs_says_so():
  case = REFERENCE['gpt2']
  no_rngs = fx.from_torch(case['sd'], layout='gpt2', dropout_rate=0.5)
  with pytest.raises(ValueError, match='needs an rng'):
    no_rngs(jnp.asarray(case['x']))


def test_bfloat16_checkpoint_gives_bfloat16_layers():
  case = REFERENCE['llama']
  fakes = {
    k: FakeTensor(v.astype(jnp.bfloat16).astype(np.float32), 'torch.bfloat16')
    for k, v in case['sd'].items()
  }
  x = jnp.asarray(case['x'], jnp.bfloat16)
  layer, variables = fl.from_torch(fakes, layout='llama')
  for leaf in jax.tree.leaves(nn.unbox(variables)):
    assert leaf.dtype == jnp.bfloat16
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  # 5e-2: bf16 weights and input against the float32 torch output.
  np.testing.assert_allclose(
    np.asarray(y, np.float32), case['y'], rtol=5e-2, atol=5e-2
  )
  nnx_layer = fx.from_torch(fakes, layout='llama')
  assert nnx_layer.down_proj.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(nnx_layer(x), y)
  f32_layer = fx.from_torch(fakes, layout='llama', param_dtype=jnp.float32)
  assert f32_layer.down_proj.kernel[...].dtype == jnp.float32
