"""Qwix QAT, PTQ and LoRA, and AQT, on the Linen layers.

Every flow runs with the layers' default options (``remat=True``) and must
give the numbers of the same FFN written with ``nn.Dense`` and the same
weights.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import qwix
from aqt.jax.v2.flax import aqt_flax

import flaxact
from flaxact import linen as fl
from tests import quantization_helpers as qh
from tests.layer_helpers import residuals_of_shape

T, D, H = 6, 16, 40

pytestmark = [
  # qwix 0.1.8 calls Flax APIs that Flax 0.12 deprecates.
  pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix'),
  # aqtp 0.9.0 calls jnp.promote_types on arrays (inside AqtDotGeneral).
  pytest.mark.filterwarnings(
    'ignore:Implicit conversion of an array to a dtype:DeprecationWarning'
  ),
]

# (flaxact layer, baseline): same parameter names, so one params tree fits.
LAYERS = {
  'swiglu': lambda dg=None: (
    fl.SwiGLU(H, dot_general_cls=dg),
    qh.LinenHand(H, dot_general_cls=dg),
  ),
  'geglu_bias': lambda dg=None: (
    fl.GeGLU(H, use_bias=True, dot_general_cls=dg),
    qh.LinenHand(H, act='gelu', use_bias=True, dot_general_cls=dg),
  ),
  'ffn': lambda dg=None: (
    fl.FFN(H, dot_general_cls=dg),
    qh.LinenHand(H, gated=False, act='gelu', use_bias=True, dot_general_cls=dg),
  ),
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _x():
  return jax.random.normal(jax.random.key(1), (2, T, D))


def _params(layer):
  return nn.unbox(layer.init(jax.random.key(0), _x()))


@pytest.mark.parametrize('name', list(LAYERS))
class TestQwixAndAqt:
  def test_qat_int8_forward_and_grads(self, name):
    ours, hand = LAYERS[name]()
    v, x = _params(ours), _x()
    q_ours = qwix.quantize_model(ours, qwix.QtProvider(qh.QAT_RULES))
    q_hand = qwix.quantize_model(hand, qwix.QtProvider(qh.QAT_RULES))
    y = q_ours.apply(v, x)
    chex.assert_trees_all_equal(y, q_hand.apply(v, x))
    assert qh.float_error(y, ours.apply(v, x)) > 0  # it did quantize

    def grads(model):
      return jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(v)

    chex.assert_trees_all_close(
      grads(q_ours), grads(q_hand), rtol=1e-5, atol=1e-5
    )

  def test_ptq_int8_weights(self, name):
    ours, hand = LAYERS[name]()
    v, x = _params(ours), _x()
    outputs = []
    for model in (ours, hand):
      q = qwix.quantize_model(model, qwix.PtqProvider(qh.PTQ_RULES))
      abstract = jax.eval_shape(q.init, jax.random.key(0), x)
      qparams = qwix.quantize_params(v['params'], abstract['params'])
      outputs.append(q.apply({'params': qparams}, x))
    chex.assert_trees_all_equal(outputs[0], outputs[1])
    assert 0 < qh.float_error(outputs[0], ours.apply(v, x)) < 0.05

  def test_lora(self, name):
    ours, hand = LAYERS[name]()
    x = _x()
    models = [
      qwix.apply_lora_to_model(m, qwix.LoraProvider(qh.LORA_RULES))
      for m in (ours, hand)
    ]
    v = models[0].init(jax.random.key(0), x)
    v_hand = models[1].init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nn.unbox(v)) == jax.tree.map(
      jnp.shape, nn.unbox(v_hand)
    )
    y = models[0].apply(v, x)
    chex.assert_trees_all_equal(y, models[1].apply(v, x))
    chex.assert_trees_all_equal(y, ours.apply(v, x))  # LoRA B starts at 0
    assert 'kernel_lora_a' in nn.unbox(v)['params']['up_proj']

  def test_aqt_convert_then_serve(self, name):
    mode = aqt_flax.QuantMode
    train, hand = LAYERS[name](qh.aqt_dot_general_cls(mode.TRAIN))
    v, x = _params(train), _x()
    y_train = train.apply(v, x)
    chex.assert_trees_all_equal(y_train, hand.apply(v, x))
    convert, _ = LAYERS[name](qh.aqt_dot_general_cls(mode.CONVERT))
    _, converted = convert.apply(v, x, mutable=True)
    projections = {'up_proj', 'down_proj'} | (
      {'gate_proj'} if name != 'ffn' else set()
    )
    assert set(converted['aqt']) == projections  # one instance each
    serve, _ = LAYERS[name](qh.aqt_dot_general_cls(mode.SERVE))
    y_serve = serve.apply({**v, 'aqt': converted['aqt']}, x)
    chex.assert_trees_all_equal(y_serve, y_train)
    assert 0 < qh.float_error(y_train, _float(name).apply(v, x)) < 0.05


def _float(name):
  return LAYERS[name]()[0]


def test_qat_keeps_two_hidden_sized_residuals():
  layer = qwix.quantize_model(fl.SwiGLU(H), qwix.QtProvider(qh.QAT_RULES))
  x = jax.random.normal(jax.random.key(1), (T, D))
  v = nn.unbox(layer.init(jax.random.key(0), x))

  def loss(v, x):
    return jnp.sum(layer.apply(v, x))

  hidden = residuals_of_shape(loss, (v, x), (T, H))
  assert len(hidden) == 2, hidden


@pytest.mark.parametrize('fused', [False, True])
def test_activations_in_float32_under_a_hook_that_ignores_it(fused):
  seen = []

  def bf16_hook(lhs, rhs, dims, precision=None, preferred_element_type=None):
    del preferred_element_type  # ignored, as quantized dot_generals do
    return jax.lax.dot_general(lhs, rhs, dims, precision)

  def act(g):
    seen.append(g.dtype)
    return flaxact.silu(g)

  layer = fl.GatedFFN(
    H,
    activation=act,
    dtype=jnp.bfloat16,
    activations_in_float32=True,
    dot_general=bf16_hook,
    fused_gate_up=fused,
  )
  v = layer.init(jax.random.key(0), _x())
  seen.clear()
  assert layer.apply(v, _x()).dtype == jnp.bfloat16
  assert seen and all(d == jnp.float32 for d in seen), seen
