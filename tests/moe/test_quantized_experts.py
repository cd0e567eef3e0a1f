"""Quantized expert kernels (int8 values, per-expert per-channel scales).

The grouped impls take a ``QuantizedKernel`` wherever a float kernel goes
and must give what the dequantized float kernel gives; the ``MoE`` layers
feed a Qwix PTQ model's ``QArray`` kernels to them under ``impl='auto'``
(the Qwix flows themselves are in ``tests/{linen,nnx}/*moe_quantization*``);
a scale of the wrong shape or a zero point is a ``ValueError`` naming the
expected and the given.
"""

from __future__ import annotations

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.moe import dispatch
from flaxact._src.moe.experts import fused_loop
from flaxact._src.moe.experts.api import GroupedImplUnderQuantizerWarning
from flaxact._src.moe.experts.quantized import QuantizedKernel, from_qwix
from tests import moe_quantization_helpers as mh
from tests import quantization_helpers as qh
from tests.helpers import TOL

T, D, H, E, K = 24, 16, 32, 4, 2
F32 = TOL[np.dtype(jnp.float32)]
GROUPED = ('loop', 'tiles', 'ragged')

pytestmark = mh.PYTESTMARK


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _quantize(w):
  """Symmetric int8 absmax per expert and output channel (Qwix's)."""
  scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127
  return QuantizedKernel(
    jnp.round(w / scale).astype(jnp.int8), scale, jnp.float32
  )


def _case():
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (T, D))
  weights = jax.nn.softmax(jax.random.normal(ks[1], (T, K)), -1)
  experts = jax.random.randint(ks[2], (T, K), 0, E)
  kernels = tuple(
    _quantize(jax.random.normal(k, s) * s[1] ** -0.5)
    for k, s in zip(ks[3:], ((E, D, H), (E, D, H), (E, H, D)), strict=True)
  )
  return x, weights, experts, kernels


def _ffn(impl, x, weights, experts, kernels):
  layout = dispatch.make_layout(experts, E, 1 if impl == 'ragged' else 8)
  return dispatch.experts_ffn(
    x,
    weights,
    layout,
    kernels,
    impl=impl,
    gated_product=lambda g, u: jax.nn.silu(g) * u,
  )


@pytest.mark.parametrize('impl', GROUPED)
def test_grouped_impls_equal_the_dequantized_kernels(impl):
  x, weights, experts, q = _case()
  floats = tuple(k.dequantize() for k in q)
  run = jax.jit(_ffn, static_argnums=0)
  chex.assert_trees_all_close(
    run(impl, x, weights, experts, q),
    run(impl, x, weights, experts, floats),
    **F32,
  )
  # Gradients reach x and the routing weights; the int8 kernels get none.
  loss = lambda x, w, k: jnp.sum(_ffn(impl, x, w, experts, k) ** 2)
  gq = jax.jit(jax.grad(loss, (0, 1, 2), allow_int=True))(x, weights, q)
  gf = jax.jit(jax.grad(loss, (0, 1)))(x, weights, floats)
  chex.assert_trees_all_close(gq[:2], gf, **F32)
  assert gq[2][0].values.dtype == jax.dtypes.float0
  assert not np.any(np.asarray(gq[2][0].scale))


# ------------------------------------------------------------- the layers


def _nnx_ptq(d=D, h=H):
  x = mh.x_input() if d == D else jnp.ones((2, 3, d))
  layer = fx.MoE(d, h, E, K, rngs=nnx.Rngs(0))
  provider = qwix.PtqProvider(qh.PTQ_RULES)
  # under nnx.jit, as the other Qwix NNX tests (eager Qwix is slow)
  q = nnx.jit(lambda m, x: qwix.quantize_model(m, provider, x))(layer, x)
  return layer, q, x


def _experts_nbytes(state):
  leaves = jax.tree.leaves(
    {
      n: nnx.to_pure_dict(state)[n]
      for n in ('gate_proj', 'up_proj', 'down_proj')
    }
  )
  return sum(a.nbytes for a in leaves)


def test_nnx_auto_serves_ptq_kernels_grouped_and_quarter_memory(monkeypatch):
  _, q, x = _nnx_ptq()
  seen = []
  forward = fused_loop.forward

  def recording(prod, layout, k, x, w, kernels, *args):
    seen.append(type(kernels[0]).__name__)
    return forward(prod, layout, k, x, w, kernels, *args)

  monkeypatch.setattr(fused_loop, 'forward', recording)
  y = nnx.jit(lambda q, x: q(x))(q, x)
  # 'auto' on CPU: the 'loop' impl with the int8 kernels, not 'dense'
  assert seen == ['QuantizedKernel'], seen
  q.impl = 'dense'
  chex.assert_trees_all_close(y, nnx.jit(lambda q, x: q(x))(q, x), **F32)


def test_ptq_expert_weights_take_under_0_3_of_float():
  # int8 values + float32 scales (E, 1, out): 1/4 + 1/in of the float bytes
  layer, q, _ = _nnx_ptq(64, 128)
  ratio = _experts_nbytes(nnx.state(q, nnx.Param)) / _experts_nbytes(
    nnx.state(layer, nnx.Param)
  )
  assert ratio == pytest.approx(0.25 + 1 / 64 * 2 / 3 + 1 / 128 / 3)


def test_linen_input_gradient_equals_the_dense_formulation():
  x = mh.x_input()
  v = nn.unbox(fl.MoE(H, E, K).init(jax.random.key(0), x))
  models = {
    impl: qwix.quantize_model(
      fl.MoE(H, E, K, impl=impl), qwix.PtqProvider(qh.PTQ_RULES)
    )
    for impl in ('auto', 'dense')
  }
  abstract = jax.eval_shape(models['auto'].init, jax.random.key(0), x)
  qparams = {'params': qwix.quantize_params(v['params'], abstract['params'])}
  grads = {
    impl: jax.jit(jax.grad(lambda x, m=m: jnp.sum(m.apply(qparams, x) ** 2)))(x)
    for impl, m in models.items()
  }
  chex.assert_trees_all_close(grads['auto'], grads['dense'], **F32)


def _bad(kernel, **change):
  q = kernel.array
  return kernel.replace(array=q.replace(**change))


@pytest.mark.parametrize(
  'change, words',
  [
    (
      lambda q: dict(scale=q.scale.max(0, keepdims=True)),
      f'shape {(E, 1, H)}; got scale shape {(1, 1, H)}',
    ),
    (
      lambda q: dict(scale=jnp.repeat(q.scale, 2, axis=1)),
      f'shape {(E, 1, H)}; got scale shape {(E, 2, H)}',
    ),
    (lambda q: dict(zero_point=jnp.zeros_like(q.scale)), 'zero point'),
  ],
  ids=['per_channel_across_experts', 'subchannel', 'zero_point'],
)
def test_wrong_quantized_kernels_name_expected_and_given(change, words):
  _, q, x = _nnx_ptq()
  kernel = q.gate_proj.kernel
  q.gate_proj.kernel = _bad(kernel, **change(kernel.array))
  with pytest.raises(ValueError, match='gate_proj') as info:
    q(x)
  assert words in str(info.value)


def test_from_qwix_rejects_float_values_and_wrong_rank():
  scale = jnp.ones((E, 1, H))
  with pytest.raises(ValueError, match='integer values'):
    from_qwix(qwix.QArray(jnp.ones((E, D, H)), scale), 'up_proj', jnp.float32)
  with pytest.raises(ValueError, match=r'\(E, in, out\); got \(4, 16\)'):
    from_qwix(
      qwix.QArray(jnp.ones((E, D), jnp.int8), scale[:, 0]),
      'up_proj',
      jnp.float32,
    )


def test_quantized_kernels_under_an_explicit_grouped_impl_do_not_warn():
  _, q, x = _nnx_ptq()
  q.impl = 'tiles'
  with warnings.catch_warnings():
    warnings.simplefilter('error', GroupedImplUnderQuantizerWarning)
    jax.eval_shape(lambda x: q(x), x)


# ------------------------------------------------------------------ QAT


def _qat_paths(monkeypatch, rule):
  """The products the fused loop ran with under Qwix QAT ``rule``."""
  seen = []
  forward = fused_loop.forward

  def recording(prod, *args):
    seen.append(type(prod).__name__)
    return forward(prod, *args)

  monkeypatch.setattr(fused_loop, 'forward', recording)
  x = mh.x_input()
  layer = fx.MoE(D, H, E, K, rngs=nnx.Rngs(0))
  provider = qwix.QtProvider([rule])
  q = nnx.jit(lambda m, x: qwix.quantize_model(m, provider, x))(layer, x)
  nnx.jit(lambda q, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(q))(q, x)
  return seen


def test_qat_default_rule_runs_grouped(monkeypatch):
  rule = qwix.QtRule(
    module_path='^(?!router).*', weight_qtype='int8', act_qtype='int8'
  )
  seen = _qat_paths(monkeypatch, rule)
  assert seen and set(seen) == {'QatProduct'}, seen


@pytest.mark.parametrize(
  'option',
  [dict(bwd_qtype='int8'), dict(tile_size=8)],
  ids=['bwd_qtype', 'subchannel'],
)
def test_qat_rules_the_grouped_path_cannot_follow_run_dense(
  monkeypatch, option
):
  rule = qwix.QtRule(
    module_path='^(?!router).*', weight_qtype='int8', act_qtype='int8', **option
  )
  assert _qat_paths(monkeypatch, rule) == []  # 'dense': Qwix's own
