"""Qwix QAT, PTQ and LoRA, and AQT, on the Linen ``MoE``.

Every flow runs with the layer's default options (``impl='auto'``,
``remat=True``) and must give the numbers of the MoE a user writes by hand
(:class:`tests.moe_quantization_helpers.LinenMoE`) with the same params
tree: under Qwix or a ``dot_general``/``dot_general_cls`` hook the layer
runs each expert projection as one ``dot_general`` over the stacked kernel
inside ``gate_proj``/``up_proj``/``down_proj``.
"""

from __future__ import annotations

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax

from flaxact import linen as fl
from flaxact._src.moe import dispatch
from flaxact._src.moe.experts.api import tile_rows
from flaxact._src.moe.routing_step import GroupedImplUnderQuantizerWarning
from tests import moe_quantization_helpers as mh
from tests import quantization_helpers as qh
from tests.helpers import TOL
from tests.layer_helpers import residuals_of_shape

D, H, E, K = mh.D, mh.H, mh.E, mh.K
EXPERTS = ('gate_proj', 'up_proj', 'down_proj')
F32 = TOL[np.dtype(jnp.float32)]
# Quantized values agree exactly; gradients differ by float32 rounding of
# flaxact's custom-JVP gated product versus autodiff of silu(g) * u.
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)
MODE = aqt_flax.QuantMode

pytestmark = mh.PYTESTMARK


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


_x = mh.x_input


def _pair(variant='base', **hook):
  """``(flaxact MoE, hand-written MoE)``: one params tree fits both."""
  kw = mh.VARIANTS[variant]
  return fl.MoE(H, E, K, **kw, **hook), mh.LinenMoE(**kw, **hook)


@functools.cache
def _init(variant):
  layer = fl.MoE(H, E, K, **mh.VARIANTS[variant])
  shapes = jax.eval_shape(layer.init, jax.random.key(0), _x())
  return mh.random_params(nn.unbox(shapes)['params'])


def _params(variant='base'):
  """Random params of the ``MoE`` ``variant`` (a hook adds no params)."""
  return {'params': jax.tree.map(lambda a: a, _init(variant))}


# Each test runs its models in one jitted program: eagerly, Qwix and the
# layer run op by op, and compiling every op dominates these tests' time.


def _call(models, variables, x):
  """``[model.apply(v, x)]`` for each model and its variables."""

  @jax.jit
  def run(variables, x):
    return [m.apply(v, x) for m, v in zip(models, variables, strict=True)]

  return run(variables, x)


def _run(models, variables, x, plain=None):
  """``[(y, grads wrt v)]`` of each model, ``loss = sum(y ** 2)``.

  With ``plain``, ``plain.apply(variables[0], x)`` (no gradient) comes
  last.
  """

  def one(model, v, x):
    def loss(v):
      y = model.apply(v, x)
      return jnp.sum(y**2), y

    (_, y), g = jax.value_and_grad(loss, has_aux=True)(v)
    return y, g

  @jax.jit
  def run(variables, x):
    out = [one(m, v, x) for m, v in zip(models, variables, strict=True)]
    return out if plain is None else [*out, plain.apply(variables[0], x)]

  return run(variables, x)


def test_float_baseline_is_the_same_moe():
  # impl='auto' picks 'dense' under Qwix or a dot_general hook.
  dense = fl.MoE(H, E, K, impl='dense', **mh.VARIANTS['shared'])
  _, hand = _pair('shared')
  v = _params('shared')
  chex.assert_trees_all_equal(*_call([dense, hand], [v, v], _x()))


@pytest.mark.parametrize('variant', list(mh.VARIANTS))
@pytest.mark.parametrize('impl', ['dense', 'auto'])
def test_qat_int8_forward_and_grads(variant, impl):
  layer, hand = _pair(variant)
  layer = layer.clone(impl=impl)  # 'auto': grouped, quantized as Qwix would
  v, x = _params(variant), _x()
  q, q_hand = (
    qwix.quantize_model(m, qwix.QtProvider(qh.QAT_RULES)) for m in (layer, hand)
  )
  (y, g), (y_hand, g_hand), y_float = _run([q, q_hand], [v, v], x, hand)
  assert 0 < qh.float_error(y, y_float) < 0.05  # it did quantize
  if impl == 'auto':
    mh.assert_qat_within_rounding(y, y_hand, y_float, g, g_hand)
    return
  chex.assert_trees_all_equal(y, y_hand)
  chex.assert_trees_all_close(g, g_hand, **GRAD_TOL)
  for name in EXPERTS:
    assert np.any(np.asarray(g['params'][name]['kernel']) != 0), name


def test_qat_static_scale_with_mutable_quant_stats():
  layer, hand = _pair()
  x = _x()
  models = [
    qwix.quantize_model(m, qwix.QtProvider(qh.QAT_STATIC_RULES))
    for m in (layer, hand)
  ]
  v = nn.unbox(jax.jit(models[0].init)(jax.random.key(0), x))
  assert set(EXPERTS) <= set(v['quant_stats']), v['quant_stats'].keys()

  @jax.jit
  def step(states, x):
    outs = []
    for m, s in zip(models, states, strict=True):

      def loss(params, s=s, m=m):
        y, new = m.apply({**s, 'params': params}, x, mutable=['quant_stats'])
        return jnp.sum(y**2), (y, new)

      (_, (y, new)), g = jax.value_and_grad(loss, has_aux=True)(s['params'])
      outs.append((y, g, {**s, **new}))
    return outs, layer.apply({'params': states[0]['params']}, x)

  states = [v, v]
  for _ in range(2):  # the statistics move on each call
    ((y, g, s), (y_hand, g_hand, s_hand)), y_float = step(states, x)
    chex.assert_trees_all_equal(y, y_hand)
    chex.assert_trees_all_close(g, g_hand, **GRAD_TOL)
    chex.assert_trees_all_close(s['quant_stats'], s_hand['quant_stats'], **F32)
    states = [s, s_hand]
  counts = [
    int(c)
    for c in jax.tree.leaves(s['quant_stats']['down_proj'])
    if c.ndim == 0
  ]
  assert counts == [2], counts
  assert qh.float_error(y, y_float) > 0  # it did quantize


@pytest.mark.parametrize('variant', list(mh.VARIANTS))
def test_ptq_int8_quantizes_the_expert_kernels(variant):
  layer, hand = _pair(variant)
  v, x = _params(variant), _x()
  models, variables = [], []
  for model in (layer, hand):
    q = qwix.quantize_model(model, qwix.PtqProvider(qh.PTQ_RULES))
    abstract = jax.eval_shape(q.init, jax.random.key(0), x)
    qparams = qwix.quantize_params(v['params'], abstract['params'])
    models.append(q)
    variables.append({'params': qparams})
    for name, out in (('gate_proj', H), ('up_proj', H), ('down_proj', D)):
      kernel = qparams[name]['kernel'].array
      assert kernel.qvalue.dtype == jnp.int8
      assert kernel.qvalue.shape == v['params'][name]['kernel'].shape
      # one scale per expert and output channel
      assert kernel.scale.shape == (E, 1, out)
  y, y_hand, y_float = _call([*models, hand], [*variables, v], x)
  # Served by the grouped impl (int8 kernels dequantized per expert): the
  # hand-written dense formulation's value up to float32 summation order.
  chex.assert_trees_all_close(y, y_hand, **F32)
  dense = qwix.quantize_model(
    fl.MoE(H, E, K, **mh.VARIANTS[variant], impl='dense'),
    qwix.PtqProvider(qh.PTQ_RULES),
  )
  (y_dense,) = _call([dense], variables[:1], x)
  chex.assert_trees_all_equal(y_dense, y_hand)
  assert 0 < qh.float_error(y, y_float) < 0.05


def test_lora_adapts_the_experts_and_trains():
  layer, hand = _pair()
  x = _x()
  models = [
    qwix.apply_lora_to_model(m, qwix.LoraProvider(qh.LORA_RULES))
    for m in (layer, hand)
  ]
  v = nn.unbox(jax.jit(models[0].init)(jax.random.key(0), x))
  v_hand = nn.unbox(jax.eval_shape(models[1].init, jax.random.key(0), x))
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_hand)
  for name in EXPERTS:
    assert {'kernel_lora_a', 'kernel_lora_b'} <= set(v['params'][name])
  # the float model ignores the LoRA params
  (y, g), (y_hand, g_hand), y_float = _run(models, [v, v], x, hand)
  chex.assert_trees_all_equal(y, y_float)  # LoRA B starts at 0
  chex.assert_trees_all_equal(y_hand, y_float)
  chex.assert_trees_all_close(g, g_hand, **GRAD_TOL)
  for name in EXPERTS:
    # with B = 0 only B receives a gradient
    grads = g['params'][name]
    assert np.any(np.asarray(grads['kernel_lora_b']) != 0), name
    assert not np.any(np.asarray(grads['kernel_lora_a'])), name
  stepped = [_lora_sgd_step(v, grads) for grads in (g, g_hand)]
  y, y_hand = _call(models, stepped, x)
  chex.assert_trees_all_close(y, y_hand, **GRAD_TOL)
  assert qh.float_error(y, y_float) > 1e-3  # the step moved the output


def _lora_sgd_step(v, grads):
  """One SGD step (rate 0.1) on the LoRA params only."""
  return {
    'params': {
      name: {
        k: a - 0.1 * grads['params'][name][k] if 'lora' in k else a
        for k, a in sub.items()
      }
      for name, sub in v['params'].items()
    }
  }


@pytest.mark.parametrize('variant', ['base', 'shared'])
def test_aqt_dot_general_cls_train_convert_serve(variant):
  def pair(mode):
    return _pair(variant, dot_general_cls=qh.aqt_dot_general_cls(mode))

  train, hand = pair(MODE.TRAIN)
  v, x = _params(variant), _x()
  convert, _ = pair(MODE.CONVERT)
  _, converted = jax.jit(lambda v, x: convert.apply(v, x, mutable=True))(v, x)
  aqt = converted['aqt']
  names = {'router', *EXPERTS}
  if variant == 'shared':
    names |= {'shared_expert', 'shared_expert_gate'}
    assert set(aqt['shared_expert']) == set(EXPERTS)
  assert set(aqt) == names
  for name in (*EXPERTS, 'router'):
    assert set(aqt[name]) == {'AqtDotGeneral_0'}  # one instance each
    qrhs = aqt[name]['AqtDotGeneral_0']['qrhs']
    assert qrhs['value'].shape == v['params'][name]['kernel'].shape
    assert qrhs['value'].dtype == jnp.int8
  serve, _ = pair(MODE.SERVE)
  y_train, y_hand, y_float = _call([train, hand, _pair(variant)[0]], [v] * 3, x)
  chex.assert_trees_all_equal(y_train, y_hand)
  # its own program: fused with the others, XLA may round differently
  (y_serve,) = _call([serve], [{**v, 'aqt': aqt}], x)
  chex.assert_trees_all_equal(y_serve, y_train)
  assert 0 < qh.float_error(y_train, y_float) < 0.05


def test_aqt_functional_dot_general_equals_baseline_and_trains():
  dg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  layer, hand = _pair(dot_general=dg)
  v, x = _params(), _x()
  (y, g), (y_hand, g_hand), y_float = _run([layer, hand], [v, v], x, _pair()[0])
  chex.assert_trees_all_equal(y, y_hand)
  assert 0 < qh.float_error(y, y_float) < 0.05
  chex.assert_trees_all_close(g, g_hand, **GRAD_TOL)
  for name in EXPERTS:
    kernel_grad = np.asarray(g['params'][name]['kernel'])
    assert np.isfinite(kernel_grad).all() and np.any(kernel_grad != 0)


@pytest.mark.parametrize('impl', ['dense', 'auto'])
def test_qat_keeps_two_expert_hidden_sized_residuals(impl):
  moe = fl.MoE(H, E, K, impl=impl)
  layer = qwix.quantize_model(moe, qwix.QtProvider(qh.QAT_RULES))
  x = _x()
  v = _params()

  def loss(v, x):
    return jnp.sum(layer.apply(v, x))

  t = x.size // D
  # 'dense': (E, T, H); 'auto': the grouped impl's padded rows (R, H)
  tile = tile_rows(moe.tile_size, 'loop', t * K, E)  # the CPU's grouped impl
  rows = dispatch.num_rows(t * K, E, tile, None)
  shape = (E, t, H) if impl == 'dense' else (rows, H)
  hidden = residuals_of_shape(loss, (v, x), shape)
  assert len(hidden) == 2, hidden


def test_grouped_impl_with_a_dot_general_cls_is_an_error():
  with pytest.raises(ValueError, match="impl='loop' runs the experts in"):
    fl.MoE(
      H, E, K, impl='loop', dot_general_cls=qh.aqt_dot_general_cls(MODE.TRAIN)
    )


def _ptq(layer, v, x):
  """Qwix PTQ of ``layer``: ``(model, its quantized params)``."""
  q = qwix.quantize_model(layer, qwix.PtqProvider(qh.PTQ_RULES))
  abstract = jax.eval_shape(q.init, jax.random.key(0), x)
  return q, {'params': qwix.quantize_params(v['params'], abstract['params'])}


def test_quantized_kernels_are_served_by_an_explicit_grouped_impl():
  x = _x()
  v = _params()
  auto, qparams = _ptq(fl.MoE(H, E, K), v, x)  # quantized with impl='auto'
  with mh.warns_grouped():  # its own float init warns
    loop, _ = _ptq(fl.MoE(H, E, K, impl='loop'), v, x)
  with warnings.catch_warnings():
    warnings.simplefilter('error', GroupedImplUnderQuantizerWarning)
    y = jax.jit(loop.apply)(qparams, x)
  chex.assert_trees_all_close(y, jax.jit(auto.apply)(qparams, x), **F32)


def test_ptq_of_an_explicit_grouped_impl_warns_and_leaves_experts_float():
  x = _x()
  layer = fl.MoE(H, E, K, impl='loop')
  with mh.warns_grouped():
    q, qparams = _ptq(layer, _params(), x)
    jax.eval_shape(q.apply, qparams, x)
  assert qparams['params']['gate_proj']['kernel'].dtype == jnp.float32
