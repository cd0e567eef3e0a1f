"""The docs' "Checkpoints and export" recipes, run as written.

``tests/docs_recipes.py`` extracts the section's code blocks. The
one-device recipes run here; the same functions are then reused for stacked
layers (no mesh) and bfloat16 compute with float32 parameters. The mesh
recipes run in one subprocess on 8 simulated CPU devices.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests import docs_recipes
from tests.multidevice import json_report

L = 4  # stacked layers


def _assert_restored(saved, restored):
  """Every leaf restored bit-exactly, with its dtype."""
  for path, leaf in docs_recipes.compare(saved, restored).items():
    assert leaf['equal'] and leaf['same_dtype'], (path, leaf)


def _nnx_state(model, optimizer):
  return {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}


def test_docs_page_has_every_recipe():
  assert list(docs_recipes.recipes()) == [
    'nnx',
    'nnx-mesh',
    'linen',
    'linen-mesh',
    'export',
  ]


# ------------------------------------------------------------------ NNX


@pytest.fixture(scope='module')
def nnx_recipe(tmp_path_factory):
  return docs_recipes.run(('nnx',), tmp_path_factory.mktemp('ckpt'))


def test_nnx_recipe_restores_model_and_optimizer(nnx_recipe):
  ns = nnx_recipe
  model, optimizer = ns['model'], ns['optimizer']
  model2, optimizer2 = ns['model2'], ns['optimizer2']
  _assert_restored(_nnx_state(model, optimizer), _nnx_state(model2, optimizer2))
  assert optimizer2.step[...] == 1
  # bfloat16 compute with float32 parameters survives the round trip
  assert model2.gate_proj.kernel[...].dtype == jnp.float32
  assert model2(ns['x']).dtype == jnp.bfloat16
  # training goes on from the restored state exactly as from the saved one
  ns['train_step'](model, optimizer, ns['x'])
  ns['train_step'](model2, optimizer2, ns['x'])
  _assert_restored(_nnx_state(model, optimizer), _nnx_state(model2, optimizer2))


class _NNXStack(nnx.Module):
  """``L`` SwiGLU layers made with ``nnx.vmap``, run with ``nnx.scan``."""

  def __init__(self, rngs):
    meta = {nnx.PARTITION_NAME: 'layers'}

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=meta)
    def create(rngs):
      return fx.SwiGLU(64, 96, dtype=jnp.bfloat16, rngs=rngs)

    self.layers = create(rngs)
    self.meta = meta

  def __call__(self, x):
    @nnx.scan(
      in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta
    )
    def body(x, layer):
      return x + layer(x)

    return body(x, self.layers)


def test_nnx_recipe_functions_restore_stacked_layers(nnx_recipe, tmp_path):
  ns = nnx_recipe

  def create():
    model = _NNXStack(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  model, optimizer = create()
  ns['train_step'](model, optimizer, ns['x'])
  ns['save'](tmp_path / 'stack', model, optimizer)
  model2, optimizer2 = ns['restore'](tmp_path / 'stack', create)
  assert model2.layers.gate_proj.kernel[...].shape == (L, 64, 96)
  _assert_restored(_nnx_state(model, optimizer), _nnx_state(model2, optimizer2))
  np.testing.assert_array_equal(model2(ns['x']), model(ns['x']))


# ---------------------------------------------------------------- Linen


@pytest.fixture(scope='module')
def linen_recipe(tmp_path_factory):
  return docs_recipes.run(('linen',), tmp_path_factory.mktemp('ckpt'))


def test_linen_recipe_restores_params_and_optimizer_state(linen_recipe):
  ns = linen_recipe
  state, restored = ns['state'], ns['restored']
  _assert_restored(state, restored)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  assert restored['opt_state'][0].count == 1
  x, step = ns['x'], ns['train_step']
  _assert_restored(step(state, x), step(restored, x))


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + fl.SwiGLU(96, dtype=jnp.bfloat16)(x), None


def test_linen_recipe_functions_restore_stacked_layers(linen_recipe, tmp_path):
  ns = linen_recipe
  stack = nn.scan(
    _LinenBlock,
    variable_axes={'params': 0},
    split_rngs={'params': True},
    length=L,
    metadata_params={nn.PARTITION_NAME: 'layers'},
  )()
  tx = optax.adamw(1e-3)
  x = jnp.ones((8, 64), jnp.bfloat16)

  def init_state(key):
    params = stack.init(key, x, None)['params']
    return {'params': params, 'opt_state': tx.init(params)}

  state = nn.unbox(init_state(jax.random.key(0)))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'stack', state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      tmp_path / 'stack', ns['abstract_state'](init_state)
    )
  kernel = restored['params']['SwiGLU_0']['gate_proj']['kernel']
  assert kernel.shape == (L, 64, 96) and kernel.dtype == jnp.float32
  _assert_restored(state, restored)
  y = stack.apply({'params': restored['params']}, x, None)[0]
  assert y.dtype == jnp.bfloat16


# --------------------------------------------------------------- export


def test_export_recipe_round_trips_forward_and_gradient():
  with jax.default_matmul_precision('highest'):
    ns = docs_recipes.run(('export',), None)
    params, x = ns['params'], ns['x']
    want = {
      'forward': jax.jit(ns['forward'])(params, x),
      'grad': jax.jit(jax.grad(ns['loss']))(params, x),
      'linen_forward': jax.jit(ns['linen_layer'].apply)(ns['variables'], x),
    }
    args = {'linen_forward': (ns['variables'], x)}
    assert set(ns['blobs']) == set(want)
    for name, blob in ns['blobs'].items():
      exported = jax.export.deserialize(blob)
      assert exported.platforms == ('cpu', 'tpu', 'cuda'), name
      got = exported.call(*args.get(name, (params, x)))
      # the exported function and jit compile the same computation
      chex.assert_trees_all_equal(got, want[name])
  chex.assert_trees_all_equal(ns['y'], want['forward'])


# ----------------------------------------------------------------- mesh


def _mesh_report(ckpt_dir) -> dict:
  return json_report(docs_recipes.__file__, ckpt_dir)


def test_mesh_recipes_keep_shardings_and_values(tmp_path):
  """Both mesh chains in one subprocess on 8 simulated CPU devices."""
  report = _mesh_report(tmp_path)
  assert sorted(report) == sorted(docs_recipes.MESH_CHAINS)
  for chain, result in report.items():
    assert 'error' not in result, (chain, result.get('error'))
    assert result['outputs_equal'], chain
    leaves = result['leaves']
    for path, leaf in leaves.items():
      assert leaf['same_sharding'] and leaf['equal'], (chain, path, leaf)
      assert leaf['same_dtype'] and leaf['devices'] == 8, (chain, path, leaf)
    # FSDP_TENSOR_PARALLEL_RULES: kernels and their Adam moments on both axes
    kernels = {p: f['spec'] for p, f in leaves.items() if 'kernel' in p}
    assert len(kernels) == 9, (chain, kernels)  # 3 kernels, mu, nu
    for path, spec in kernels.items():
      want = "P('model', 'data')" if 'down' in path else "P('data', 'model')"
      assert spec == want, (chain, path, spec)
