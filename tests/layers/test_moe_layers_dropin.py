"""Issue 22: MoE as a drop-in FFN (bridge, ``deterministic``, drop counts),
``from_torch`` naming missing trailing experts, lazy ``flaxact.nnx``."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from tests.moe_torch_helpers import state_dict


def test_to_linen_records_the_aux_values():
  layer = nnx.bridge.to_linen(fx.MoE, 16, 32, 4, 2, record_intermediates=True)
  x = jnp.ones((3, 16))
  v = layer.init(jax.random.key(0), x)
  y, state = layer.apply(v, x, mutable=['intermediates'])
  assert y.shape == (3, 16)
  assert {'load_balancing_loss', 'router_z_loss', 'expert_load'} <= set(
    state['intermediates']
  )


def test_deterministic_is_accepted_as_by_the_dense_ffns():
  layer = fl.MoE(32, 4, 2)
  x = jnp.ones((3, 16))
  v = layer.init(jax.random.key(0), x)
  np.testing.assert_array_equal(
    layer.apply(v, x, deterministic=True), layer.apply(v, x)
  )
  m = fx.MoE(16, 32, 4, 2, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(m(x, deterministic=False), m(x))


def test_dropped_assignments_are_recorded_under_capacity():
  x = jax.random.normal(jax.random.key(1), (16, 16))
  layer = fl.MoE(32, 4, 2, capacity_factor=0.25)
  v = layer.init(jax.random.key(0), x)
  _, state = layer.apply(v, x, mutable=['intermediates'])
  dropped = int(state['intermediates']['dropped_assignments'][0])
  assert dropped >= 16 * 2 - 4 * 2  # capacity 2 per expert
  m = fx.MoE(16, 32, 4, 2, capacity_factor=0.25, rngs=nnx.Rngs(0))
  _, rec = nnx.capture(m, nnx.Intermediate)(x)
  assert int(rec['dropped_assignments'][0]) >= 24
  _, rec = nnx.capture(
    fx.MoE(16, 32, 4, 2, rngs=nnx.Rngs(0)), nnx.Intermediate
  )(x)
  assert 'dropped_assignments' not in rec  # dropless: nothing to count


@pytest.mark.parametrize('missing', [0, 3])
def test_from_torch_names_missing_expert_keys(missing):
  sd, prefix = state_dict('mixtral', 'per_expert')
  sd = {k: v for k, v in sd.items() if f'experts.{missing}.' not in k}
  with pytest.raises(ValueError, match=rf'experts\.{missing}\.w1\.weight'):
    fx.from_torch(sd, layout='mixtral', prefix=prefix)


def test_import_flaxact_exposes_the_layer_namespaces_lazily():
  code = (
    'import sys, flaxact; assert "flax" not in sys.modules;'
    ' assert flaxact.nnx.MoE and flaxact.linen.MoE and "flax" in sys.modules'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_fused_gate_up_equals_the_unfused_pair_within_tolerance():
  # Not bit for bit: one fused matmul may round differently from two.
  x = jax.random.normal(jax.random.key(0), (256, 64))
  a = fx.SwiGLU(64, 176, rngs=nnx.Rngs(0))
  b = fx.SwiGLU(64, 176, fused_gate_up=True, rngs=nnx.Rngs(0))
  b.gate_up_proj.kernel[...] = jnp.stack(
    [a.gate_proj.kernel[...], a.up_proj.kernel[...]], 1
  )
  b.down_proj.kernel[...] = a.down_proj.kernel[...]
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(a(x), b(x), rtol=1e-5, atol=1e-5)
