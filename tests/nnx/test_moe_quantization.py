"""Qwix QAT, PTQ and LoRA, and AQT's functional API, on the NNX ``MoE``.

Every flow runs with the layer's default options (``impl='auto'``,
``remat=True``) and must give the numbers of the MoE a user writes by hand
(:class:`tests.moe_quantization_helpers.NnxMoE`) holding the same weights:
under Qwix (or a ``dot_general`` hook) the layer runs its experts as one
``dot_general`` per expert projection over the stacked kernel, inside
``gate_proj``/``up_proj``/``down_proj``, so the experts are quantized and
adapted as the router and shared expert are.
"""

from __future__ import annotations

import functools
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from aqt.jax.v2 import config as aqt_config
from flax import nnx

import flaxact
from flaxact import nnx as fx
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

pytestmark = mh.PYTESTMARK


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


_x = mh.x_input


# Models are quantized, called and differentiated under nnx.jit, the flaxact
# layer and its baseline in one program: eagerly, Qwix and the layer run op
# by op, and compiling every op dominates these tests' time.
# test_eager_ptq_recipe runs Qwix's eager recipe.


@functools.cache
def _split(variant, impl):
  layer = fx.MoE(
    D, H, E, K, **mh.VARIANTS[variant], impl=impl, rngs=nnx.Rngs(0)
  )
  params = nnx.state(layer, nnx.Param)
  nnx.replace_by_pure_dict(params, mh.random_params(nnx.to_pure_dict(params)))
  nnx.update(layer, params)
  return nnx.split(layer)


def _layer(variant='base', *, impl='auto'):
  """A new flaxact ``MoE`` (the same random weights for every ``impl``)."""
  return nnx.merge(*_split(variant, impl))


def _pair(variant='base'):
  layer = _layer(variant)
  return layer, mh.nnx_hand_like(layer, **mh.VARIANTS[variant])


def _quantize(models, provider, x, rngs=()):
  """``qwix.quantize_model`` of each model (given ``rngs``: LoRA)."""

  def quantize(models, x, rngs):
    if not rngs:
      return [qwix.quantize_model(m, provider, x) for m in models]
    return [
      qwix.apply_lora_to_model(m, provider, x, rngs=r)
      for m, r in zip(models, rngs, strict=True)
    ]

  return nnx.jit(quantize)(models, x, rngs)


def _loss(model, x):
  y = model(x)
  return jnp.sum(y**2), y


@functools.partial(nnx.jit, static_argnames='wrt')
def _run(models, x, plain=None, wrt=nnx.Param):
  """``[(y, grads wrt wrt)]`` of each model, ``loss = sum(y ** 2)``.

  With ``plain``, ``plain(x)`` (no gradient) comes last.
  """
  grad = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
  out = [(y, g) for (_, y), g in (grad(m, x) for m in models)]
  return out if plain is None else [*out, plain(x)]


@nnx.jit
def _call(models, x):
  return [m(x) for m in models]


def _flat(state):
  """``{'a/b/c': leaf}`` of a ``State`` (quantized arrays included)."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
  return {'/'.join(str(k.key) for k in path): v for path, v in leaves}


def _assert_same_grads(g, g_hand):
  g, g_hand = _flat(g), _flat(g_hand)
  chex.assert_trees_all_close(g, g_hand, **GRAD_TOL)
  return g


def test_float_baseline_is_the_same_moe():
  # impl='auto' picks 'dense' under Qwix or a dot_general hook.
  dense = _layer('shared', impl='dense')
  hand = mh.nnx_hand_like(dense, **mh.VARIANTS['shared'])
  chex.assert_trees_all_equal(*_call([dense, hand], _x()))


@pytest.mark.parametrize('impl', ['dense', 'auto'])
@pytest.mark.parametrize('variant', list(mh.VARIANTS))
def test_qat_int8_forward_and_grads(variant, impl):
  layer, hand = _pair(variant)
  layer.impl = impl  # 'auto': the grouped impl, quantized as Qwix would
  x = _x()
  q, q_hand = _quantize([layer, hand], qwix.QtProvider(qh.QAT_RULES), x)
  (y, g), (y_hand, g_hand), y_float = _run([q, q_hand], x, hand)
  assert 0 < qh.float_error(y, y_float) < 0.05  # it did quantize
  if impl == 'auto':
    mh.assert_qat_within_rounding(y, y_hand, y_float, _flat(g), _flat(g_hand))
    return
  chex.assert_trees_all_equal(y, y_hand)
  g = _assert_same_grads(g, g_hand)
  for name in EXPERTS:
    assert np.any(np.asarray(g[f'{name}/kernel']) != 0), name


def test_qat_with_capacity_quantizes_each_token_as_dropless():
  """The capacity slots and the all-token rows quantize a token alike.

  Qwix scales activations per row and kernels per expert and channel, so a
  token none of whose assignments was dropped gets the same quantized output
  whether its expert rows are capacity slots or every token.
  """
  x = _x()
  layer = _layer()
  capped = _layer()
  capped.capacity_factor = 0.75
  t = x.size // D
  c = math.ceil(0.75 * t * K / E)
  assert c < t  # the slots path
  # The router stays float, so both route alike and _dropped is exact.
  rules = [
    qwix.QtRule(
      module_path='^(?!router).*', weight_qtype='int8', act_qtype='int8'
    )
  ]
  models = _quantize([layer, capped], qwix.QtProvider(rules), x)
  y, y_cap = nnx.jit(_call)(models, x)
  dropped = _dropped(capped, x)
  whole = ~dropped.any(-1).reshape(y.shape[:-1])
  assert 0 < int(whole.sum()) < whole.size  # both kinds of token
  np.testing.assert_allclose(
    np.asarray(y_cap)[whole], np.asarray(y)[whole], rtol=1e-6, atol=1e-6
  )
  assert not np.allclose(np.asarray(y_cap), np.asarray(y))
  assert qh.float_error(y, nnx.jit(_call)([layer], x)[0]) > 0  # quantized


def _dropped(layer, x):
  """``(T, k)`` assignments ``layer``'s capacity drops (float routing)."""
  logits = layer.router(x.reshape(-1, D)).astype(jnp.float32)
  _, aux = flaxact.moe_ffn(
    x.reshape(-1, D),
    jnp.zeros((D, E)),
    jnp.zeros((E, D, H)),
    jnp.zeros((E, D, H)),
    jnp.zeros((E, H, D)),
    experts_per_token=K,
    router_logits=logits,
    capacity_factor=layer.capacity_factor,
  )
  return np.asarray(aux.dropped)


def test_qat_static_scale_under_nnx_jit_and_grad():
  x = _x()
  provider = qwix.QtProvider(qh.QAT_STATIC_RULES)
  layer, hand = _pair()
  models = _quantize([layer, hand], provider, x)
  for _ in range(2):  # the statistics move on each call
    (y, g), (y_hand, g_hand) = _run(models, x)
    chex.assert_trees_all_equal(y, y_hand)
    _assert_same_grads(g, g_hand)
  y, y_hand, y_float = _call([*models, hand], x)
  chex.assert_trees_all_equal(y, y_hand)
  assert qh.float_error(y, y_float) > 0  # it did quantize
  stats = [_flat(nnx.state(m, qwix.QuantStat)) for m in models]
  chex.assert_trees_all_close(*stats, **F32)
  for name in EXPERTS:
    assert stats[0][f'{name}/dot_general0_lhs/count'] == 3, stats[0]


@pytest.mark.parametrize('variant', list(mh.VARIANTS))
def test_ptq_int8_quantizes_the_expert_kernels(variant):
  layer, hand = _pair(variant)
  x = _x()
  q, q_hand = _quantize([layer, hand], qwix.PtqProvider(qh.PTQ_RULES), x)
  params = _flat(nnx.state(q, nnx.Param))
  for name, out in (('gate_proj', H), ('up_proj', H), ('down_proj', D)):
    qvalue = params[f'{name}/kernel/array/qvalue']
    assert qvalue.dtype == jnp.int8 and qvalue.shape[0] == E
    # one scale per expert and output channel
    assert params[f'{name}/kernel/array/scale'].shape == (E, 1, out)
  assert params['router/kernel/array/qvalue'].dtype == jnp.int8
  y, y_hand, y_float = _call([q, q_hand, hand], x)
  # Served by the grouped impl (int8 kernels dequantized per expert): the
  # hand-written dense formulation's value up to float32 summation order.
  chex.assert_trees_all_close(y, y_hand, **F32)
  q.impl = 'dense'  # the dense formulation is the hand-written one exactly
  chex.assert_trees_all_equal(_call([q], x)[0], y_hand)
  assert 0 < qh.float_error(y, y_float) < 0.05


def test_eager_ptq_recipe():
  layer, hand = _pair()
  x = _x()
  q = qwix.quantize_model(layer, qwix.PtqProvider(qh.PTQ_RULES), x)
  (q_jit,) = _quantize([hand], qwix.PtqProvider(qh.PTQ_RULES), x)
  # jit fuses the whole layer, eager runs op by op: 1 ulp apart
  chex.assert_trees_all_close(q(x), *_call([q_jit], x), **F32)


def test_lora_adapts_the_experts_and_trains():
  layer, hand = _pair()
  x = _x()
  provider = qwix.LoraProvider(qh.LORA_RULES)
  models = _quantize(
    [layer, hand], provider, x, rngs=[nnx.Rngs(3), nnx.Rngs(3)]
  )
  lora = [_flat(nnx.state(m, nnx.LoRAParam)) for m in models]
  chex.assert_trees_all_equal(*lora)  # same shapes, same draws
  for name in EXPERTS:
    assert {f'{name}/kernel_lora_a', f'{name}/kernel_lora_b'} <= set(lora[0])
  (y, g), (y_hand, g_hand), y_float = _run(models, x, hand, wrt=nnx.LoRAParam)
  chex.assert_trees_all_equal(y, y_float)  # LoRA B starts at 0
  chex.assert_trees_all_equal(y_hand, y_float)
  flat = _assert_same_grads(g, g_hand)
  for name in EXPERTS:
    # with B = 0 only B receives a gradient
    assert np.any(np.asarray(flat[f'{name}/kernel_lora_b']) != 0), name
    assert not np.any(np.asarray(flat[f'{name}/kernel_lora_a'])), name
  for m, grads in zip(models, (g, g_hand), strict=True):  # one SGD step
    state = nnx.state(m, nnx.LoRAParam)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, state, grads))
  y, y_hand = _call(models, x)
  chex.assert_trees_all_close(y, y_hand, **GRAD_TOL)
  assert qh.float_error(y, y_float) > 1e-3  # the step moved the output


def test_aqt_functional_dot_general_equals_baseline_and_trains():
  dg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  layer = fx.MoE(D, H, E, K, dot_general=dg, rngs=nnx.Rngs(0))
  mh.copy_state(_layer(), layer, nnx.Param)
  hand = mh.nnx_hand_like(layer, dot_general=dg)
  x = _x()
  (y, g), (y_hand, g_hand), y_float = _run([layer, hand], x, _layer())
  chex.assert_trees_all_equal(y, y_hand)
  assert 0 < qh.float_error(y, y_float) < 0.05
  g = _assert_same_grads(g, g_hand)
  for name in EXPERTS:
    kernel_grad = np.asarray(g[f'{name}/kernel'])
    assert np.isfinite(kernel_grad).all() and np.any(kernel_grad != 0)


@pytest.mark.parametrize('impl', ['dense', 'auto'])
def test_qat_keeps_two_expert_hidden_sized_residuals(impl):
  x = _x()
  (q,) = _quantize([_layer(impl=impl)], qwix.QtProvider(qh.QAT_RULES), x)
  graphdef, state = nnx.split(q)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))

  t = x.size // D
  # 'dense': (E, T, H); 'auto': the grouped impl's padded rows (R, H)
  tile = tile_rows(q.tile_size, 'loop', t * K, E)  # the CPU's grouped impl
  rows = dispatch.num_rows(t * K, E, tile, None)
  shape = (E, t, H) if impl == 'dense' else (rows, H)
  hidden = residuals_of_shape(loss, (state, x), shape)
  assert len(hidden) == 2, hidden


def test_grouped_impl_with_a_dot_general_hook_is_an_error():
  with pytest.raises(ValueError, match="impl='loop' runs the experts in"):
    fx.MoE(
      D,
      H,
      E,
      K,
      impl='loop',
      dot_general_cls=lambda: jax.lax.dot_general,
      rngs=nnx.Rngs(0),
    )


@pytest.mark.parametrize('impl', ['loop', 'tiles', 'ragged'])
def test_quantized_kernels_are_served_by_every_grouped_impl(impl):
  x = _x()
  (q,) = _quantize([_layer()], qwix.PtqProvider(qh.PTQ_RULES), x)
  (want,) = _call([q], x)  # 'auto': the grouped impl of this backend
  q.impl = impl  # quantized with 'auto', then switched to a grouped impl
  with warnings.catch_warnings():
    warnings.simplefilter('error', GroupedImplUnderQuantizerWarning)
    chex.assert_trees_all_close(*_call([q], x), want, **F32)


def test_ptq_of_an_explicit_grouped_impl_warns_and_leaves_experts_float():
  x = _x()
  with mh.warns_grouped():
    (q,) = _quantize([_layer(impl='loop')], qwix.PtqProvider(qh.PTQ_RULES), x)
  assert q.gate_proj.kernel[...].dtype == jnp.float32
  assert q.router.kernel[...].array.qvalue.dtype == jnp.int8
