"""Qwix on the NNX ``MoE`` layer: what it quantizes and what it leaves.

The router, ``shared_expert`` and ``shared_expert_gate`` are the dense
layers' projections, so Qwix quantizes them as it does ``GatedFFN``; the
experts' stacked kernels are not a Qwix quantization point (their grouped
matmul is the impl's own), so PTQ leaves them in float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from flaxact import nnx as fx

# qwix 0.1.8 calls Flax APIs that Flax 0.12 deprecates (as in
# tests/test_quantization_nnx.py); flaxact itself uses neither.
pytestmark = [
  pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix'),
  pytest.mark.filterwarnings(
    "ignore:'.value' setter is now deprecated:DeprecationWarning"
  ),
]


@nnx.jit
def _layer():
  return fx.MoE(16, 32, 4, 2, shared_hidden_features=32, rngs=nnx.Rngs(0))


def _x():
  return jax.random.normal(jax.random.key(1), (2, 6, 16))


def test_ptq_int8_quantizes_router_and_shared_expert_not_experts():
  layer, x = _layer(), _x()
  want = nnx.jit(lambda m, x: m(x))(layer, x)
  rules = [qwix.QuantizationRule(module_path='.*', weight_qtype='int8')]
  q = qwix.quantize_model(layer, qwix.PtqProvider(rules), x)
  dtypes = {
    '/'.join(map(str, path)): v[...].dtype
    for path, v in nnx.to_flat_state(nnx.state(q, nnx.Param))
  }
  for name in (
    'router',
    'shared_expert/gate_proj',
    'shared_expert/up_proj',
    'shared_expert/down_proj',
  ):
    assert dtypes[f'{name}/kernel/array/qvalue'] == jnp.int8, dtypes
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    assert dtypes[f'{name}/kernel'] == jnp.float32, dtypes
  y = jax.jit(lambda x: q(x))(x)
  assert y.shape == want.shape and np.all(np.isfinite(y))


def test_qat_on_the_shared_expert_trains():
  layer, x = _layer(), _x()
  want = nnx.jit(lambda m, x: m(x))(layer, x)
  rules = [
    qwix.QtRule(
      module_path='shared_expert.*', weight_qtype='int8', act_qtype='int8'
    )
  ]
  q = qwix.quantize_model(layer, qwix.QtProvider(rules), x)
  y = nnx.jit(lambda q, x: q(x))(q, x)
  assert 0 < float(jnp.max(jnp.abs(y - want))) < 0.2  # it did quantize
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(q, x)
  g = nnx.to_pure_dict(grads)
  assert np.any(np.asarray(g['shared_expert']['gate_proj']['kernel']) != 0)
  assert np.any(np.asarray(g['gate_proj']['kernel']) != 0)
