"""``nnx.from_torch`` under a mesh, on 8 simulated CPU devices.

Run by ``tests/interop/test_torch_import_sharding.py`` in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxact import nnx as fx
from tests.multidevice import auto_mesh, require_devices
from tests.torch_helpers import REFERENCE

P = jax.sharding.PartitionSpec


@pytest.fixture(scope='module')
def mesh():
  require_devices(8)
  return auto_mesh((2, 4), ('data', 'model'))


def _spec(param) -> P:
  return param[...].sharding.spec


@pytest.mark.parametrize(
  'rules, up, down',
  [
    (fx.TENSOR_PARALLEL_RULES, P(None, 'model'), P('model', None)),
    (fx.FSDP_RULES, P('data', None), P(None, 'data')),
    (fx.FSDP_TENSOR_PARALLEL_RULES, P('data', 'model'), P('model', 'data')),
  ],
)
def test_loaded_layer_is_sharded_by_the_rule_set(mesh, rules, up, down):
  case = REFERENCE['llama_bias']
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    layer = fx.from_torch(case['sd'], layout='llama')
  for proj in (layer.gate_proj, layer.up_proj):
    assert _spec(proj.kernel) == up
    assert _spec(proj.bias) == P(up[1])
  assert _spec(layer.down_proj.kernel) == down
  assert _spec(layer.down_proj.bias) == P(down[1])
  # The values are the state dict's, on every shard.
  np.testing.assert_array_equal(
    np.asarray(layer.down_proj.kernel[...]), case['sd']['down_proj.weight'].T
  )
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    with jax.default_matmul_precision('highest'):
      y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(case['x']))
  # 1e-5: a sharded matmul sums its partial products in another order.
  np.testing.assert_allclose(y, case['y'], rtol=1e-5, atol=1e-5)


def test_loaded_fused_layer_with_dropout_trains_on_the_mesh(mesh):
  case = REFERENCE['gemma']
  rules = fx.TENSOR_PARALLEL_RULES
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    layer = fx.from_torch(
      case['sd'],
      layout='gemma',
      fused_gate_up=True,
      dropout_rate=0.1,
      rngs=nnx.Rngs(params=0, dropout=1),
    )
    assert _spec(layer.gate_up_proj.kernel) == P(None, None, 'model')
    x = jnp.asarray(case['x'])

    @nnx.jit
    def grads(m):
      return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)

    g = grads(layer)
  kernel = g['gate_up_proj']['kernel'][...]
  assert kernel.sharding.spec == P(None, None, 'model')
  assert np.all(np.isfinite(np.asarray(kernel)))
