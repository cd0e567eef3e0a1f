"""``from_torch`` for routed FFNs: Linen and NNX ``MoE`` vs ``transformers``.

Every layout in both key formats is loaded and run in float32 at matmul
precision ``'highest'``; outputs, input gradients, weight gradients and the
chosen experts are compared with real ``transformers`` 5 sparse-MoE blocks
stored in ``tests/data/moe_reference.npz`` (see ``tests/moe_torch_helpers``;
neither torch nor ``transformers`` is needed), and Linen and NNX must agree
exactly.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from tests.moe_torch_helpers import (
  FORMATS,
  LAYOUTS,
  REFERENCE,
  reference_grads,
  state_dict,
)

# Reason: transformers and flaxact sum the experts' float32 contributions in
# different orders; the largest differences seen are ~3e-6 on values of ~1.
F32_VS_TORCH = dict(rtol=1e-5, atol=1e-5)


def _runner(linen_layer, nnx_layer):
  """One jitted function: Linen's and NNX's ``y`` and the weight and input
  gradients of ``sum(y * cotangent)``, and Linen's recorded expert load.

  Given the variables of layers of the same configuration (the other key
  format), it runs them without compiling again.
  """
  graphdef = nnx.graphdef(nnx_layer)

  @jax.jit
  def run(variables, params, rest, x, cotangent):
    def linen(p, x):
      y, state = linen_layer.apply(
        {**variables, 'params': p}, x, mutable=['intermediates']
      )
      return y, state['intermediates']['expert_load'][0]

    y, vjp, load = jax.vjp(linen, variables['params'], x, has_aux=True)
    grads, dx = vjp(cotangent)
    # rest (the BatchStat) is an input too: the layer writes it back.
    y_nnx, vjp = jax.vjp(
      lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, x
    )
    grads_nnx, _, dx_nnx = vjp(cotangent)
    return (
      (y, nn.unbox(grads), dx, load),
      (y_nnx, nnx.to_pure_dict(grads_nnx), dx_nnx),
    )

  return run


def _load(layout, key_format, framework, **kwargs):
  sd, prefix = state_dict(layout, key_format)
  kwargs.setdefault('config', REFERENCE[layout]['config'])
  module = fl if framework == 'linen' else fx
  return module.from_torch(sd, layout=layout, prefix=prefix, **kwargs)


def _routing(layer, params, bias, x):
  """The router's logits and top-k from the loaded weights and settings."""
  tokens = x.reshape(-1, x.shape[-1])
  logits = tokens @ params['router']['kernel']
  if 'bias' in params['router']:
    logits = logits + params['router']['bias'][None]
  weights, experts = flaxact.top_k_routing(
    logits,
    layer.experts_per_token,
    router=layer.router,
    normalize_weights=layer.normalize_weights,
    score_correction_bias=bias,
    routed_scaling_factor=layer.routed_scaling_factor,
    num_groups=layer.num_groups,
    groups_per_token=layer.groups_per_token,
  )
  return logits, weights, experts


def _by_expert(weights, experts):
  """Both ``(T, k)``, each row sorted by expert index."""
  order = np.argsort(experts, axis=-1)
  return (
    np.take_along_axis(np.asarray(weights), order, -1),
    np.take_along_axis(np.asarray(experts), order, -1),
  )


@pytest.mark.parametrize('layout', LAYOUTS)
def test_linen_and_nnx_match_transformers(layout):
  """Both key formats, Linen and NNX, against the stored module."""
  case = REFERENCE[layout]
  x, cotangent = case['x'], case['cotangent']
  want_grads = reference_grads(layout)
  want_w, want_e = _by_expert(case['topk_weights'], case['topk_experts'])
  run = None
  with jax.default_matmul_precision('highest'):
    for key_format in FORMATS:
      layer, variables = _load(layout, key_format, 'linen')
      nnx_layer = _load(layout, key_format, 'nnx')
      assert isinstance(layer, fl.MoE) and isinstance(nnx_layer, fx.MoE)
      run = run or _runner(layer, nnx_layer)
      _, params, rest = nnx.split(nnx_layer, nnx.Param, ...)
      linen_out, nnx_out = run(variables, params, rest, x, cotangent)
      y, grads, dx, load = linen_out
      np.testing.assert_allclose(y, case['y'], **F32_VS_TORCH)
      np.testing.assert_allclose(dx, case['dx'], **F32_VS_TORCH)
      assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
      jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, **F32_VS_TORCH),
        grads,
        want_grads,
      )
      # NNX, given the same state dict, agrees with Linen exactly.
      y_nnx, grads_nnx, dx_nnx = nnx_out
      np.testing.assert_array_equal(y_nnx, y)
      jax.tree.map(np.testing.assert_array_equal, grads_nnx, grads)
      np.testing.assert_array_equal(dx_nnx, dx)

      # Routing: the loaded router and settings choose transformers' experts.
      bias = variables.get('batch_stats', {}).get('score_correction_bias')
      if layout == 'deepseek_v3':
        sd, prefix = state_dict(layout, key_format)
        want_bias = sd[prefix + 'gate.e_score_correction_bias']
        np.testing.assert_array_equal(bias, want_bias)
        assert isinstance(nnx_layer.score_correction_bias, nnx.BatchStat)
        np.testing.assert_array_equal(
          nnx_layer.score_correction_bias[...], want_bias
        )
      params = nn.unbox(variables)['params']
      logits, weights, experts = _routing(layer, params, bias, x)
      np.testing.assert_allclose(logits, case['router_logits'], **F32_VS_TORCH)
      got_w, got_e = _by_expert(weights, experts)
      np.testing.assert_array_equal(got_e, want_e)
      np.testing.assert_allclose(got_w, want_w, **F32_VS_TORCH)
      np.testing.assert_array_equal(
        load, np.bincount(want_e.ravel(), minlength=layer.num_experts)
      )


# --- settings: overrides, config, published defaults ------------------------


def _forward(layout, **kwargs):
  """Linen ``y`` of the stored case loaded with ``kwargs``."""
  sd, _ = state_dict(layout, 'stacked')
  layer, variables = fl.from_torch(sd, layout=layout, **kwargs)
  with jax.default_matmul_precision('highest'):
    return layer, jax.jit(layer.apply)(variables, REFERENCE[layout]['x'])


def test_overrides_win_over_config():
  # The config says renormalise; the override (transformers' value) wins.
  config = {**REFERENCE['qwen2_moe']['config'], 'norm_topk_prob': True}
  layer, y = _forward('qwen2_moe', config=config, normalize_weights=False)
  assert layer.normalize_weights is False
  np.testing.assert_allclose(y, REFERENCE['qwen2_moe']['y'], **F32_VS_TORCH)
  sd, _ = state_dict('qwen2_moe', 'stacked')
  layer, _ = fl.from_torch(sd, layout='qwen2_moe', config=config)
  assert layer.normalize_weights is True

  # num_groups=None is a setting (ungrouped), not "not given".
  sd, _ = state_dict('deepseek_v3', 'stacked')
  config = REFERENCE['deepseek_v3']['config']
  nnx_layer = fx.from_torch(
    sd,
    layout='deepseek_v3',
    config=config,
    experts_per_token=4,
    num_groups=None,
    groups_per_token=None,
    routed_scaling_factor=1.0,
  )
  assert (nnx_layer.num_groups, nnx_layer.groups_per_token) == (None, None)
  assert nnx_layer.experts_per_token == 4
  assert nnx_layer.routed_scaling_factor == 1.0
  assert fx.from_torch(sd, layout='deepseek_v3', config=config).num_groups == 4


def test_config_object_and_published_defaults():
  # A transformers config is read by attribute: a namespace stands in.
  sd, _ = state_dict('deepseek_v3', 'stacked')
  fields = REFERENCE['deepseek_v3']['config']
  by_attribute, variables = fl.from_torch(
    sd, layout='deepseek_v3', config=types.SimpleNamespace(**fields)
  )
  by_key, same_variables = fl.from_torch(
    sd, layout='deepseek_v3', config=fields
  )
  assert repr(by_attribute) == repr(by_key)
  assert (by_key.num_groups, by_key.groups_per_token) == (4, 2)
  assert by_key.experts_per_token == 3
  jax.tree.map(np.testing.assert_array_equal, variables, same_variables)
  # Without a config, OLMoE's published norm_topk_prob=False applies.
  layer, y = _forward('olmoe', experts_per_token=2)
  assert layer.normalize_weights is False
  np.testing.assert_allclose(y, REFERENCE['olmoe']['y'], **F32_VS_TORCH)
  # Qwen3-MoE's published checkpoints renormalise.
  sd, _ = state_dict('qwen3_moe', 'stacked')
  layer, _ = fl.from_torch(sd, layout='qwen3_moe', experts_per_token=2)
  assert layer.normalize_weights is True


def test_gpt_oss_clamp_comes_from_config():
  layer = _load('gpt_oss', 'stacked', 'nnx')
  assert layer.gated_product is not None
  assert layer.gated_product.keywords == {'alpha': 1.702, 'limit': 1.5}
  sd, _ = state_dict('gpt_oss', 'stacked')
  layer = fx.from_torch(sd, layout='gpt_oss', experts_per_token=2)
  assert layer.gated_product.keywords == {'alpha': 1.702, 'limit': 7.0}


@pytest.mark.parametrize('framework', ['linen', 'nnx'])
def test_missing_experts_per_token_names_the_config_field(framework):
  sd, _ = state_dict('mixtral', 'stacked')
  module = fl if framework == 'linen' else fx
  with pytest.raises(ValueError, match='num_experts_per_tok'):
    module.from_torch(sd, layout='mixtral')
  with pytest.raises(ValueError, match='num_experts_per_tok'):
    module.from_torch(sd, layout='mixtral', config={'hidden_act': 'silu'})


def test_activation_dtype_and_layer_options():
  sd, _ = state_dict('qwen2_moe', 'stacked')
  layer, variables = fl.from_torch(
    sd,
    layout='qwen2_moe',
    experts_per_token=2,
    activation='gelu',
    param_dtype=jnp.bfloat16,
    dtype=jnp.bfloat16,
    impl='tiles',
    capacity_factor=2.0,
  )
  assert layer.activation == 'gelu'
  assert (layer.impl, layer.capacity_factor) == ('tiles', 2.0)
  assert layer.dtype == jnp.bfloat16
  leaves = jax.tree.leaves(nn.unbox(variables))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
  # DeepSeek-V3's correction bias stays float32 whatever param_dtype.
  sd, _ = state_dict('deepseek_v3', 'stacked')
  layer = fx.from_torch(
    sd,
    layout='deepseek_v3',
    config=REFERENCE['deepseek_v3']['config'],
    param_dtype=jnp.bfloat16,
  )
  assert layer.gate_proj.kernel.dtype == jnp.bfloat16
  assert layer.score_correction_bias[...].dtype == jnp.float32


# --- prefix, strict --------------------------------------------------------


def test_prefix_selects_the_block_in_a_model():
  sd, prefix = state_dict('mixtral', 'per_expert')
  model = {
    **sd,
    'model.embed_tokens.weight': np.zeros((4, 16), np.float32),
    'model.layers.1.block_sparse_moe.gate.weight': np.zeros((8, 16)),
  }
  config = REFERENCE['mixtral']['config']
  layer = fx.from_torch(
    model, layout='mixtral', prefix=prefix.rstrip('.'), config=config
  )
  np.testing.assert_array_equal(
    layer.router.kernel[...], sd[prefix + 'gate.weight'].T
  )
  with pytest.raises(ValueError, match='prefix='):
    fx.from_torch(model, layout='mixtral', config=config)


def test_strict_rejects_unknown_keys_under_the_prefix():
  sd, _ = state_dict('qwen3_moe', 'stacked')
  sd['experts.extra'] = np.zeros((2,), np.float32)
  config = REFERENCE['qwen3_moe']['config']
  with pytest.raises(ValueError, match=r"unexpected key.*'experts\.extra'"):
    fl.from_torch(sd, layout='qwen3_moe', config=config)
  layer, _ = fl.from_torch(sd, layout='qwen3_moe', config=config, strict=False)
  assert layer.num_experts == 8


# --- errors ----------------------------------------------------------------


def test_unknown_layout_names_the_closest_of_either_kind():
  sd, _ = state_dict('mixtral', 'stacked')
  for module in (fl, fx):
    with pytest.raises(ValueError, match="Did you mean 'mixtral'") as err:
      module.from_torch(sd, layout='mixtrl')
    message = str(err.value)
    assert "'llama'" in message and "'deepseek_v3'" in message
    with pytest.raises(ValueError, match="Did you mean 'llama'"):
      module.from_torch(sd, layout='lama')


def test_options_the_state_dict_fixes_are_rejected():
  sd, _ = state_dict('mixtral', 'stacked')
  config = REFERENCE['mixtral']['config']
  for module in (fl, fx):
    for name, value in [
      ('num_experts', 8),
      ('hidden_features', 12),
      ('use_bias', True),
      ('shared_hidden_features', 4),
      ('gated_product', flaxact.gpt_oss_glu),
    ]:
      with pytest.raises(TypeError, match=f'sets {name}'):
        module.from_torch(sd, layout='mixtral', config=config, **{name: value})
    with pytest.raises(ValueError, match='fused_gate_up'):
      module.from_torch(sd, layout='mixtral', config=config, fused_gate_up=True)
  with pytest.raises(TypeError, match='sets in_features'):
    fx.from_torch(sd, layout='mixtral', config=config, in_features=16)


def test_routing_keywords_are_rejected_for_dense_layouts():
  rng = np.random.default_rng(0)
  dense = {
    'gate_proj.weight': rng.normal(size=(12, 8)),
    'up_proj.weight': rng.normal(size=(12, 8)),
    'down_proj.weight': rng.normal(size=(8, 12)),
  }
  for module in (fl, fx):
    with pytest.raises(TypeError, match=r"config.*layout 'llama' is a dense"):
      module.from_torch(dense, layout='llama', config={'hidden_act': 'silu'})
    with pytest.raises(TypeError, match='num_groups'):
      module.from_torch(dense, layout='llama', num_groups=None)


def test_activation_errors():
  sd, _ = state_dict('gpt_oss', 'stacked')
  with pytest.raises(ValueError, match='swiglu_limit'):
    fl.from_torch(sd, layout='gpt_oss', experts_per_token=2, activation='gelu')

  class SiLU:  # stands in for torch.nn.SiLU: fails on JAX arrays
    def __call__(self, x):
      raise TypeError('silu(): argument must be Tensor')

  sd, _ = state_dict('mixtral', 'stacked')
  with pytest.raises(TypeError, match="activation='silu'"):
    fx.from_torch(sd, layout='mixtral', experts_per_token=2, activation=SiLU())
