"""Qwix QAT, PTQ and LoRA, and dot_general hooks, on the NNX layers.

Every flow runs with the layers' default options (``remat=True``) and must
give the numbers of the same FFN written with ``nnx.Linear`` and the same
weights.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
import qwix
from aqt.jax.v2 import config as aqt_config
from flax import nnx

import flaxact
from flaxact import nnx as fx
from tests import quantization_helpers as qh
from tests.layer_helpers import residuals_of_shape

T, D, H = 6, 16, 40

# qwix 0.1.8 calls Flax APIs that Flax 0.12 deprecates (Module.iter_modules,
# Variable.value); flaxact itself uses neither.
pytestmark = [
  pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix'),
  pytest.mark.filterwarnings(
    "ignore:'.value' setter is now deprecated:DeprecationWarning"
  ),
]

LAYERS = {
  'swiglu': (lambda: fx.SwiGLU(D, H, rngs=nnx.Rngs(0)), True, 'silu', False),
  'gated_fused_bias': (
    lambda: fx.GatedFFN(
      D, H, use_bias=True, fused_gate_up=True, rngs=nnx.Rngs(0)
    ),
    True,
    'silu',
    True,
  ),
  'ffn': (lambda: fx.FFN(D, H, rngs=nnx.Rngs(0)), False, 'gelu', True),
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _x():
  return jax.random.normal(jax.random.key(1), (2, T, D))


def _pair(name):
  make, gated, act, bias = LAYERS[name]
  ours = make()
  if getattr(ours, 'gate_up_proj', None) is not None:
    # Copy the fused kernel into separate gate/up layers of the baseline.
    hand = qh.NnxHand(
      D, H, gated=True, act=act, use_bias=bias, rngs=nnx.Rngs(9)
    )
    k, b = ours.gate_up_proj.kernel[...], ours.gate_up_proj.bias[...]
    hand.gate_proj.kernel[...], hand.up_proj.kernel[...] = k[:, 0], k[:, 1]
    hand.gate_proj.bias[...], hand.up_proj.bias[...] = b[0], b[1]
    hand.down_proj.kernel[...] = ours.down_proj.kernel[...]
    hand.down_proj.bias[...] = ours.down_proj.bias[...]
    return ours, hand
  return ours, qh.nnx_hand_like(ours, gated=gated, act=act, use_bias=bias)


def _loss(model, x):
  return jnp.sum(model(x) ** 2)


@pytest.mark.parametrize('name', list(LAYERS))
class TestQwix:
  def test_qat_int8_forward_and_grads(self, name):
    ours, hand = _pair(name)
    x = _x()
    q_ours = qwix.quantize_model(ours, qwix.QtProvider(qh.QAT_RULES), x)
    q_hand = qwix.quantize_model(hand, qwix.QtProvider(qh.QAT_RULES), x)
    chex.assert_trees_all_equal(q_ours(x), q_hand(x))
    # Quantized values are equal; the gradients differ only by float32
    # rounding of the custom-JVP product versus autodiff.
    g_ours = nnx.to_pure_dict(nnx.grad(_loss)(q_ours, x))
    g_hand = nnx.to_pure_dict(nnx.grad(_loss)(q_hand, x))
    assert qh.float_error(q_ours(x), ours(x)) > 0  # it did quantize
    chex.assert_trees_all_close(
      qh.param_leaves(qh.unfuse(g_ours)),
      qh.param_leaves(g_hand),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_qat_static_scale(self, name):
    ours, hand = _pair(name)
    x = _x()
    provider = qwix.QtProvider(qh.QAT_STATIC_RULES)
    q_ours = qwix.quantize_model(ours, provider, x)
    q_hand = qwix.quantize_model(hand, qwix.QtProvider(qh.QAT_STATIC_RULES), x)
    chex.assert_trees_all_equal(q_ours(x), q_hand(x))
    nnx.grad(_loss)(q_ours, x)  # statistics update inside the remat

  def test_ptq_int8_weights(self, name):
    ours, hand = _pair(name)
    x = _x()
    q_ours = qwix.quantize_model(ours, qwix.PtqProvider(qh.PTQ_RULES), x)
    q_hand = qwix.quantize_model(hand, qwix.PtqProvider(qh.PTQ_RULES), x)
    y = q_ours(x)
    chex.assert_trees_all_equal(y, q_hand(x))
    assert 0 < qh.float_error(y, ours(x)) < 0.05
    chex.assert_trees_all_equal(jax.jit(lambda x: q_ours(x))(x), y)

  def test_lora(self, name):
    ours, hand = _pair(name)
    x = _x()
    l_ours = qwix.apply_lora_to_model(
      ours, qwix.LoraProvider(qh.LORA_RULES), x, rngs=nnx.Rngs(3)
    )
    l_hand = qwix.apply_lora_to_model(
      hand, qwix.LoraProvider(qh.LORA_RULES), x, rngs=nnx.Rngs(3)
    )
    chex.assert_trees_all_equal(l_ours(x), ours(x))  # LoRA B starts at 0
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    g = qh.param_leaves(nnx.to_pure_dict(grads(l_ours, x)))
    assert {k for _, k in g} == {'kernel_lora_a', 'kernel_lora_b'}
    if name != 'gated_fused_bias':  # LoRA of a fused kernel is its own
      g_hand = qh.param_leaves(nnx.to_pure_dict(grads(l_hand, x)))
      chex.assert_trees_all_close(g, g_hand, rtol=1e-5, atol=1e-6)


def test_qat_keeps_two_hidden_sized_residuals():
  layer = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (T, D))
  q = qwix.quantize_model(layer, qwix.QtProvider(qh.QAT_RULES), x)
  graphdef, state = nnx.split(q)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))

  hidden = residuals_of_shape(loss, (state, x), (T, H))
  assert len(hidden) == 2, hidden


def test_dot_general_cls_one_instance_per_projection():
  class Counting:
    def __init__(self):
      self.calls = 0

    def __call__(self, lhs, rhs, dims, precision=None, **kw):
      self.calls += 1
      return jax.lax.dot_general(lhs, rhs, dims, precision, **kw)

  layer = fx.SwiGLU(D, H, dot_general_cls=Counting, rngs=nnx.Rngs(0))
  plain = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal(layer(_x()), plain(_x()))
  hooks = [
    layer.gate_proj.dot_general,
    layer.up_proj.dot_general,
    layer.down_proj.dot_general,
  ]
  assert len({id(h) for h in hooks}) == 3
  assert all(h.calls >= 1 for h in hooks)


def test_aqt_functional_dot_general_trains():
  # AQT's functional API: the config object is a dot_general.
  dg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  layer = fx.SwiGLU(D, H, dot_general=dg, rngs=nnx.Rngs(0))
  plain = fx.SwiGLU(D, H, rngs=nnx.Rngs(0))
  y = layer(_x())
  assert 0 < qh.float_error(y, plain(_x())) < 0.05
  g = nnx.grad(_loss)(layer, _x())
  assert jnp.isfinite(g['gate_proj']['kernel'][...]).all()


@pytest.mark.parametrize('fused', [False, True])
def test_activations_in_float32_under_a_hook_that_ignores_it(fused):
  seen = []

  def bf16_hook(lhs, rhs, dims, precision=None, preferred_element_type=None):
    del preferred_element_type  # ignored, as quantized dot_generals do
    return jax.lax.dot_general(lhs, rhs, dims, precision)

  def act(g):
    seen.append(g.dtype)
    return flaxact.silu(g)

  layer = fx.GatedFFN(
    D,
    H,
    activation=act,
    dtype=jnp.bfloat16,
    activations_in_float32=True,
    dot_general=bf16_hook,
    fused_gate_up=fused,
    rngs=nnx.Rngs(0),
  )
  y = layer(_x())
  assert y.dtype == jnp.bfloat16
  assert seen and all(d == jnp.float32 for d in seen), seen
