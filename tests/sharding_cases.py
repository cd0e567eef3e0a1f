"""Sharding cases on 8 simulated CPU devices, mesh ``data=2, model=4``.

Run by ``tests/layers/test_sharding.py`` in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts, so it cannot share a process with the other tests).
"""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.multidevice import auto_mesh, require_devices

B, D, H = 8, 16, 32
MODEL = 4
P = jax.sharding.PartitionSpec
# An all-reduce sums MODEL partial products in another order than one matmul.
SHARDED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def mesh():
  require_devices(8)
  return auto_mesh((2, MODEL), ('data', 'model'))


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _x(shape=(B, D)):
  return jax.random.normal(jax.random.key(1), shape)


def _shard_shapes(array) -> set[tuple[int, ...]]:
  return {s.data.shape for s in array.addressable_shards}


def _collectives(hlo: str) -> list[str]:
  pattern = r'\b(all-reduce|reduce-scatter)(-start)?\('
  return [line for line in hlo.splitlines() if re.search(pattern, line)]


def _linen_sharded_init(layer, mesh, rules, x):
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.jit(layer.init, out_shardings=shardings)(jax.random.key(0), x)


def _data_sharded(x, mesh):
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, P('data')))


class TestLinen:
  def test_tensor_parallel_init_quarters_every_mlp_dim(self, mesh):
    layer = fl.SwiGLU(H, use_bias=True)
    v = _linen_sharded_init(layer, mesh, fl.TENSOR_PARALLEL_RULES, _x())
    p = nn.unbox(v)['params']
    for name in ('gate_proj', 'up_proj'):
      assert _shard_shapes(p[name]['kernel']) == {(D, H // MODEL)}
      assert _shard_shapes(p[name]['bias']) == {(H // MODEL,)}
    assert _shard_shapes(p['down_proj']['kernel']) == {(H // MODEL, D)}
    assert _shard_shapes(p['down_proj']['bias']) == {(D,)}

  def test_fused_kernel_is_quartered_along_mlp(self, mesh):
    layer = fl.SwiGLU(H, fused_gate_up=True)
    v = _linen_sharded_init(layer, mesh, fl.TENSOR_PARALLEL_RULES, _x())
    kernel = nn.unbox(v)['params']['gate_up_proj']['kernel']
    assert _shard_shapes(kernel) == {(D, 2, H // MODEL)}

  def test_fsdp_init_halves_embed(self, mesh):
    layer = fl.SwiGLU(H)
    v = _linen_sharded_init(layer, mesh, fl.FSDP_RULES, _x())
    p = nn.unbox(v)['params']
    assert _shard_shapes(p['gate_proj']['kernel']) == {(D // 2, H)}
    assert _shard_shapes(p['down_proj']['kernel']) == {(H, D // 2)}

  @pytest.mark.parametrize(
    'rules',
    [
      fl.TENSOR_PARALLEL_RULES,
      fl.FSDP_RULES,
      fl.FSDP_TENSOR_PARALLEL_RULES,
    ],
    ids=['tp', 'fsdp', 'fsdp_tp'],
  )
  def test_forward_and_grads_equal_single_device(self, mesh, rules):
    layer = fl.SwiGLU(H, use_bias=True)
    x = _x()
    v = nn.unbox(layer.init(jax.random.key(0), x))
    v = jax.tree.map(lambda a: a + 0.05, v)

    def loss(v, x):
      return jnp.sum(jnp.sin(layer.apply(v, x)))

    want_y = jax.jit(layer.apply)(v, x)
    want_g = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      specs = nn.get_partition_spec(layer.init(jax.random.key(0), x))
      v_sharded = jax.device_put(
        v, nn.logical_to_mesh_sharding(specs, mesh, rules)
      )
      xs = _data_sharded(x, mesh)
      got_y = jax.jit(layer.apply)(v_sharded, xs)
      got_g = jax.jit(jax.grad(loss, argnums=(0, 1)))(v_sharded, xs)
    assert len(got_y.sharding.device_set) == 8
    chex.assert_trees_all_close(got_y, want_y, **SHARDED_TOL)
    chex.assert_trees_all_close(got_g, want_g, **SHARDED_TOL)

  @pytest.mark.parametrize('n_layers', [1, 3])
  def test_tensor_parallel_forward_has_one_all_reduce_per_ffn(
    self, mesh, n_layers
  ):
    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        for _ in range(n_layers):
          x = x + fl.SwiGLU(H)(x)
        return x

    model = Stack()
    x = _x()
    rules = fl.TENSOR_PARALLEL_RULES
    v = _linen_sharded_init(model, mesh, rules, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      hlo = (
        jax.jit(model.apply)
        .lower(v, _data_sharded(x, mesh))
        .compile()
        .as_text()
      )
    found = _collectives(hlo)
    assert len(found) == n_layers, found


class TestNNX:
  def test_tensor_parallel_init_quarters_every_mlp_dim(self, mesh):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(fx.TENSOR_PARALLEL_RULES):
      layer = fx.SwiGLU(D, H, use_bias=True, rngs=nnx.Rngs(0))
    for proj in (layer.gate_proj, layer.up_proj):
      assert _shard_shapes(proj.kernel[...]) == {(D, H // MODEL)}
      assert _shard_shapes(proj.bias[...]) == {(H // MODEL,)}
    assert _shard_shapes(layer.down_proj.kernel[...]) == {(H // MODEL, D)}

  def test_forward_and_grads_equal_single_device(self, mesh):
    rules = fx.TENSOR_PARALLEL_RULES
    x = _x()
    ref = fx.SwiGLU(D, H, use_bias=True, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      layer = fx.SwiGLU(D, H, use_bias=True, rngs=nnx.Rngs(0))

    def loss(m, x):
      return jnp.sum(jnp.sin(m(x)))

    want_y = nnx.jit(lambda m, x: m(x))(ref, x)
    want_g = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(ref, x)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      xs = _data_sharded(x, mesh)
      got_y = nnx.jit(lambda m, x: m(x))(layer, xs)
      got_g = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, xs)
    chex.assert_trees_all_close(got_y, want_y, **SHARDED_TOL)
    chex.assert_trees_all_close(
      nnx.to_pure_dict(got_g[0]), nnx.to_pure_dict(want_g[0]), **SHARDED_TOL
    )
    chex.assert_trees_all_close(got_g[1], want_g[1], **SHARDED_TOL)

  def test_tensor_parallel_forward_has_one_all_reduce(self, mesh):
    rules = fx.TENSOR_PARALLEL_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      layer = fx.GeGLU(D, H, rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(layer)
      hlo = (
        jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        .lower(state, _data_sharded(_x(), mesh))
        .compile()
        .as_text()
      )
    found = _collectives(hlo)
    assert len(found) == 1, found

  def test_hidden_activation_is_constrained_to_mlp(self, mesh):
    rules = fx.TENSOR_PARALLEL_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(layer)
      jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
        state, _x()
      ).jaxpr
    specs = [e.params['sharding'].spec for e in _constraints(jaxpr)]
    # gate, up and hidden: the last axis on 'model', the batch unconstrained
    assert specs == [P(P.UNCONSTRAINED, 'model')] * 3, specs


def _constraints(jaxpr):
  found = [e for e in jaxpr.eqns if e.primitive.name == 'sharding_constraint']
  for sub in jax.extend.core.subjaxprs(jaxpr):
    found += _constraints(sub)
  return found
