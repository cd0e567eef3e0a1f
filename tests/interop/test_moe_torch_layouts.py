"""Tests of the routed-FFN (MoE) state-dict reader against real modules.

torch and ``transformers`` are not needed: the weights (in both key formats),
inputs, outputs, gradients and routing of real ``transformers`` 5 sparse-MoE
blocks come from ``tests/data/moe_reference.npz``, written by
``tests/data/make_moe_reference.py`` (see its docstring to regenerate it).
The reader's arrays and settings are checked by a float64 NumPy routed FFN
written here, which must reproduce the stored ``transformers`` outputs.
"""

from __future__ import annotations

import importlib
import sys
import types

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy import special

import flaxact._src.interop.torch as torch_pkg
from flaxact._src.interop.torch import moe_layouts
from flaxact._src.interop.torch.moe_layouts import (
  TorchMoE,
  parse_moe_state_dict,
)
from tests.moe_torch_helpers import FORMATS, LAYOUTS, REFERENCE


def _parse(
  name: str, key_format: str, state_dict: dict | None = None, **kwargs
) -> TorchMoE:
  """Parses a stored case (or ``state_dict`` in its key format)."""
  case = REFERENCE[name]
  kwargs.setdefault('config', case['config'])
  prefix = case['prefix'] if key_format == 'per_expert' else ''
  if state_dict is None:
    state_dict = case[key_format]
  return parse_moe_state_dict(
    state_dict, layout=case['layout'], prefix=prefix, **kwargs
  )


def _state_dict(name: str, key_format: str = 'stacked') -> dict:
  return dict(REFERENCE[name][key_format])


# --------------------------------------------------------------------------
# The float64 NumPy routed FFN
# --------------------------------------------------------------------------
def _silu(x):
  return x * special.expit(x)


def _route(t: TorchMoE, logits: np.ndarray):
  """``(experts, weights)`` of every token, as the contract defines them."""
  s = t.settings
  k = s['experts_per_token']
  if s['router'] == 'softmax':
    probs = special.softmax(logits, axis=-1)
    experts = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    weights = np.take_along_axis(probs, experts, -1)
    if s['normalize_weights']:
      weights = weights / weights.sum(-1, keepdims=True)
    return experts, weights * s['routed_scaling_factor']
  scores = special.expit(logits)
  choice = scores + t.score_correction_bias.astype(np.float64)
  if s['num_groups'] is not None:
    grouped = choice.reshape(len(choice), s['num_groups'], -1)
    group_scores = -np.sort(-grouped, -1)[..., :2].sum(-1)
    best = np.argsort(-group_scores, -1, kind='stable')
    best = best[:, : s['groups_per_token']]
    keep = np.zeros(group_scores.shape, bool)
    np.put_along_axis(keep, best, True, -1)
    keep = np.repeat(keep, grouped.shape[-1], -1)
    choice = np.where(keep, choice, -np.inf)
  experts = np.argsort(-choice, axis=-1, kind='stable')[:, :k]
  weights = np.take_along_axis(scores, experts, -1)
  if s['normalize_weights']:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return experts, weights * s['routed_scaling_factor']


def _hidden(t: TorchMoE, gate, up):
  if t.gpt_oss_glu is None:
    assert t.settings['activation'] == 'silu'
    return _silu(gate) * up
  alpha, limit = t.gpt_oss_glu['alpha'], t.gpt_oss_glu['limit']
  g = np.minimum(gate, limit)
  return (np.clip(up, -limit, limit) + 1) * g * special.expit(alpha * g)


def _moe(t: TorchMoE, x: np.ndarray):
  """``(y, logits, experts, weights)`` of the routed FFN in float64."""
  p = {k: _f64(v) for k, v in t.params.items()}
  x2 = x.reshape(-1, t.in_features).astype(np.float64)
  logits = x2 @ p['router']['kernel'] + p['router'].get('bias', 0.0)
  experts, weights = _route(t, logits)

  def proj(name, h, idx):
    out = np.einsum('tki,tkio->tko', h, p[name]['kernel'][idx])
    return out + p[name]['bias'][idx] if 'bias' in p[name] else out

  xk = np.repeat(x2[:, None], experts.shape[1], 1)
  hidden = _hidden(
    t, proj('gate_proj', xk, experts), proj('up_proj', xk, experts)
  )
  y = (proj('down_proj', hidden, experts) * weights[..., None]).sum(1)
  if 'shared_expert' in p:
    sh = p['shared_expert']
    h = _silu(x2 @ sh['gate_proj']['kernel']) * (x2 @ sh['up_proj']['kernel'])
    shared = h @ sh['down_proj']['kernel']
    if 'shared_expert_gate' in p:
      shared = shared * special.expit(x2 @ p['shared_expert_gate']['kernel'])
    y = y + shared
  return y.reshape((*x.shape[:-1], -1)), logits, experts, weights


def _f64(tree):
  if isinstance(tree, dict):
    return {k: _f64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def _by_expert(experts, weights):
  """Sorts each token's (expert, weight) pairs by expert index."""
  order = np.argsort(experts, axis=-1)
  take = np.take_along_axis
  return take(experts, order, -1), take(weights, order, -1)


# --------------------------------------------------------------------------
# Arrays and settings
# --------------------------------------------------------------------------
@pytest.mark.parametrize('key_format', FORMATS)
@pytest.mark.parametrize('name', LAYOUTS)
def test_arrays_are_the_module_tensors(name, key_format):
  """Each array is the module's tensor, re-oriented (checked by hand here)."""
  sd = _state_dict(name)
  t = _parse(name, key_format)
  assert t.key_format == key_format
  p = t.params
  gate_up, down = sd['experts.gate_up_proj'], sd['experts.down_proj']
  if name == 'gpt_oss':  # (E, in, 2h), gate/up in alternate columns
    want_gate, want_up = gate_up[:, :, 0::2], gate_up[:, :, 1::2]
    want_down = down
    bias = sd['experts.gate_up_proj_bias']
    np.testing.assert_array_equal(p['gate_proj']['bias'], bias[:, 0::2])
    np.testing.assert_array_equal(p['up_proj']['bias'], bias[:, 1::2])
    np.testing.assert_array_equal(
      p['down_proj']['bias'], sd['experts.down_proj_bias']
    )
    np.testing.assert_array_equal(p['router']['bias'], sd['router.bias'])
    router = sd['router.weight']
  else:  # (E, 2h, in): gate rows, then up rows; (E, out, h)
    h = gate_up.shape[1] // 2
    want_gate = gate_up[:, :h].transpose(0, 2, 1)
    want_up = gate_up[:, h:].transpose(0, 2, 1)
    want_down = down.transpose(0, 2, 1)
    assert 'bias' not in p['gate_proj'] and 'bias' not in p['router']
    router = sd['gate.weight']
  np.testing.assert_array_equal(p['router']['kernel'], router.T)
  np.testing.assert_array_equal(p['gate_proj']['kernel'], want_gate)
  np.testing.assert_array_equal(p['up_proj']['kernel'], want_up)
  np.testing.assert_array_equal(p['down_proj']['kernel'], want_down)
  assert p['gate_proj']['kernel'].shape == (8, 16, 12)
  assert p['down_proj']['kernel'].shape == (8, 12, 16)
  assert t.param_dtype == np.float32
  shared = {'qwen2_moe': 'shared_expert', 'deepseek_v3': 'shared_experts'}
  if name in shared:
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      np.testing.assert_array_equal(
        p['shared_expert'][proj]['kernel'],
        sd[f'{shared[name]}.{proj}.weight'].T,
      )
  else:
    assert 'shared_expert' not in p
  if name == 'qwen2_moe':
    np.testing.assert_array_equal(
      p['shared_expert_gate']['kernel'], sd['shared_expert_gate.weight'].T
    )
  if name == 'deepseek_v3':
    np.testing.assert_array_equal(
      t.score_correction_bias, sd['gate.e_score_correction_bias']
    )
    assert np.abs(t.score_correction_bias).min() > 0
  else:
    assert t.score_correction_bias is None


EXPECTED_SETTINGS = {
  'mixtral': dict(normalize_weights=True, shared_hidden_features=None),
  'qwen2_moe': dict(
    normalize_weights=False, shared_hidden_features=20, shared_expert_gate=True
  ),
  'qwen3_moe': dict(normalize_weights=True),
  'deepseek_v3': dict(
    router='sigmoid',
    experts_per_token=3,
    normalize_weights=True,
    routed_scaling_factor=2.5,
    num_groups=4,
    groups_per_token=2,
    shared_hidden_features=24,
  ),
  'gpt_oss': dict(router_use_bias=True, use_bias=True, normalize_weights=True),
  'olmoe': dict(normalize_weights=False),
}


@pytest.mark.parametrize('name', LAYOUTS)
def test_settings_from_config(name):
  t = _parse(name, 'stacked')
  want = dict(
    experts_per_token=2,
    router='softmax',
    routed_scaling_factor=1.0,
    num_groups=None,
    groups_per_token=None,
    router_use_bias=False,
    use_bias=False,
    shared_hidden_features=None,
    shared_expert_gate=False,
  )
  want.update(EXPECTED_SETTINGS[name])
  if name == 'gpt_oss':
    assert t.gpt_oss_glu == {'alpha': 1.702, 'limit': 1.5}
  else:
    want['activation'] = 'silu'
    assert t.gpt_oss_glu is None
  assert dict(t.settings) == want
  sizes = (t.num_experts, t.in_features, t.hidden_features, t.out_features)
  assert sizes == (8, 16, 12, 16)


# --------------------------------------------------------------------------
# Against the transformers modules
# --------------------------------------------------------------------------
@pytest.mark.parametrize('key_format', FORMATS)
@pytest.mark.parametrize('name', LAYOUTS)
def test_output_and_routing_match_transformers(name, key_format):
  case = REFERENCE[name]
  t = _parse(name, key_format)
  y, logits, experts, weights = _moe(t, case['x'])
  # float32 module against a float64 reference of the same float32 weights.
  np.testing.assert_allclose(y, case['y'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    logits, case['router_logits'], rtol=1e-5, atol=1e-6
  )
  got = _by_expert(experts, weights)
  want = _by_expert(case['topk_experts'], case['topk_weights'])
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', LAYOUTS)
def test_stored_input_gradient_matches_reference(name):
  """The stored ``dx`` is the reference's derivative (central differences).

  Routing margins are >= 1e-3 (checked when the data were made), so steps
  of 1e-6 never change the chosen experts.
  """
  case = REFERENCE[name]
  t = _parse(name, 'stacked')
  x, ct = case['x'].astype(np.float64), case['cotangent'].astype(np.float64)
  step = 1e-6
  flat = x.reshape(-1)
  grad = np.empty_like(flat)
  for i in range(flat.size):
    hi, lo = flat.copy(), flat.copy()
    hi[i] += step
    lo[i] -= step
    f_hi = (_moe(t, hi.reshape(x.shape))[0] * ct).sum()
    f_lo = (_moe(t, lo.reshape(x.shape))[0] * ct).sum()
    grad[i] = (f_hi - f_lo) / (2 * step)
  # float32 torch gradient against float64 central differences.
  np.testing.assert_allclose(
    grad.reshape(x.shape), case['dx'], rtol=1e-4, atol=1e-5
  )


def test_grouping_and_correction_bias_change_the_choice():
  """The DeepSeek-V3 data exercise both: without them the choice differs."""
  case = REFERENCE['deepseek_v3']
  t = _parse('deepseek_v3', 'stacked')
  plain = _parse(
    'deepseek_v3',
    'stacked',
    overrides=dict(num_groups=None, groups_per_token=None),
  )
  no_groups = _moe(plain, case['x'])[2]
  unbiased = TorchMoE(
    **{
      **t.__dict__,
      'score_correction_bias': np.zeros(8, np.float32),
    }
  )
  no_bias = _moe(unbiased, case['x'])[2]
  want = _by_expert(case['topk_experts'], case['topk_weights'])[0]
  assert not np.array_equal(_by_expert(no_groups, no_groups)[0], want)
  assert not np.array_equal(_by_expert(no_bias, no_bias)[0], want)


# --------------------------------------------------------------------------
# Settings: config objects, overrides, published defaults
# --------------------------------------------------------------------------
def test_config_object_is_read_by_attribute():
  """A transformers config is an object; its fields are attributes."""
  config = types.SimpleNamespace(**REFERENCE['deepseek_v3']['config'])
  t = _parse('deepseek_v3', 'per_expert', config=config)
  assert t.settings == _parse('deepseek_v3', 'per_expert').settings


@pytest.mark.parametrize(
  ('name', 'want'),
  [
    ('mixtral', dict(normalize_weights=True)),
    ('qwen2_moe', dict(normalize_weights=False)),
    ('qwen3_moe', dict(normalize_weights=True)),
    ('olmoe', dict(normalize_weights=False)),
    (
      'deepseek_v3',
      dict(
        normalize_weights=True,
        routed_scaling_factor=2.5,
        num_groups=8,
        groups_per_token=4,
      ),
    ),
  ],
)
def test_published_defaults_without_config(name, want):
  """Only experts_per_token is needed; the rest are the published values."""
  if name == 'deepseek_v3':
    # 8 groups need >= 16 experts: give DeepSeek-V3's 256 x 1-wide experts.
    sd = _wide_deepseek()
  else:
    sd = _state_dict(name)
  t = parse_moe_state_dict(sd, layout=name, overrides=dict(experts_per_token=2))
  assert {k: t.settings[k] for k in want} == want
  assert t.settings['activation'] == 'silu'


def _wide_deepseek() -> dict:
  """A DeepSeek-V3 state dict with 256 experts (hidden size 1)."""
  rng = np.random.default_rng(0)
  e, d = 256, 4
  sd = {
    'gate.weight': rng.normal(size=(e, d)),
    'gate.e_score_correction_bias': rng.normal(size=(e,)),
    'experts.gate_up_proj': rng.normal(size=(e, 2, d)),
    'experts.down_proj': rng.normal(size=(e, d, 1)),
  }
  for proj, shape in (('gate', (3, d)), ('up', (3, d)), ('down', (d, 3))):
    sd[f'shared_experts.{proj}_proj.weight'] = rng.normal(size=shape)
  return sd


def test_gpt_oss_published_defaults():
  sd = _state_dict('gpt_oss')
  t = parse_moe_state_dict(
    sd, layout='gpt_oss', config=dict(num_experts_per_tok=2)
  )
  assert t.gpt_oss_glu == {'alpha': 1.702, 'limit': 7.0}
  assert 'activation' not in t.settings


def test_overrides_win_over_config():
  config = dict(REFERENCE['qwen2_moe']['config'], hidden_act='gelu')
  t = _parse(
    'qwen2_moe',
    'stacked',
    config=config,
    overrides=dict(normalize_weights=True, experts_per_token=4),
  )
  assert t.settings['normalize_weights'] is True
  assert t.settings['experts_per_token'] == 4
  assert t.settings['activation'] == 'gelu'  # from the config


def test_config_fields_a_layout_does_not_use_are_ignored():
  mixtral = dict(REFERENCE['mixtral']['config'], norm_topk_prob=False)
  mixtral.update(n_group=3, topk_group=7, routed_scaling_factor=9.0)
  t = _parse('mixtral', 'stacked', config=mixtral)
  assert t.settings['normalize_weights'] is True
  assert t.settings['num_groups'] is None
  assert t.settings['routed_scaling_factor'] == 1.0
  gpt = dict(REFERENCE['gpt_oss']['config'], hidden_act='no_such_act')
  assert 'activation' not in _parse('gpt_oss', 'stacked', config=gpt).settings


def test_missing_experts_per_token_names_the_config_field():
  with pytest.raises(
    ValueError, match=r"'num_experts_per_tok'.*experts_per_token="
  ):
    parse_moe_state_dict(_state_dict('olmoe'), layout='olmoe')
  config = dict(REFERENCE['olmoe']['config'], num_experts_per_tok=None)
  with pytest.raises(ValueError, match='num_experts_per_tok'):
    parse_moe_state_dict(_state_dict('olmoe'), layout='olmoe', config=config)


@pytest.mark.parametrize(
  ('field', 'value'),
  [
    ('num_local_experts', 16),
    ('hidden_size', 32),
    ('intermediate_size', 24),
  ],
)
def test_config_of_another_model_is_an_error(field, value):
  config = dict(REFERENCE['mixtral']['config'], **{field: value})
  with pytest.raises(ValueError, match=f"config field '{field}' is {value}"):
    _parse('mixtral', 'stacked', config=config)


def test_shared_sizes_are_checked_against_config():
  config = dict(REFERENCE['deepseek_v3']['config'], n_shared_experts=1)
  with pytest.raises(ValueError, match="'n_shared_experts'"):
    _parse('deepseek_v3', 'stacked', config=config)
  config = dict(
    REFERENCE['qwen2_moe']['config'], shared_expert_intermediate_size=8
  )
  with pytest.raises(ValueError, match="'shared_expert_intermediate_size'"):
    _parse('qwen2_moe', 'stacked', config=config)


@pytest.mark.parametrize(
  ('overrides', 'match'),
  [
    (dict(experts_per_token=9), r'num_experts_per_tok\) must be .*\[1, 8\]'),
    (dict(experts_per_token=True), 'num_experts_per_tok'),
    (dict(num_groups=3), 'n_group must split the 8 experts'),
    (dict(num_groups=8), 'n_group must split'),
    (dict(groups_per_token=5), 'topk_group must be in'),
    (dict(groups_per_token=1), 'hold the 3 experts'),
    (dict(num_groups=None), 'they go together'),
    (dict(activation='no_such_act'), 'no_such_act'),
  ],
)
def test_bad_settings(overrides, match):
  with pytest.raises(ValueError, match=match):
    _parse('deepseek_v3', 'stacked', overrides=overrides)


def test_unknown_override_and_gpt_oss_activation():
  with pytest.raises(TypeError, match="Did you mean 'experts_per_token'"):
    _parse('mixtral', 'stacked', overrides=dict(expert_per_token=2))
  with pytest.raises(ValueError, match='activation= does not apply'):
    _parse('gpt_oss', 'stacked', overrides=dict(activation='silu'))


# --------------------------------------------------------------------------
# Errors: keys, layouts, shapes
# --------------------------------------------------------------------------
def test_unknown_layout_names_the_closest():
  with pytest.raises(ValueError, match="Did you mean 'mixtral'"):
    parse_moe_state_dict(_state_dict('mixtral'), layout='mixtrl')
  t = _parse('qwen2_moe', 'stacked')
  assert (
    parse_moe_state_dict(
      _state_dict('qwen2_moe'),
      layout='Qwen2-MoE',
      config=REFERENCE['qwen2_moe']['config'],
    ).settings
    == t.settings
  )


@pytest.mark.parametrize(
  ('name', 'key_format', 'key'),
  [
    ('mixtral', 'per_expert', 'experts.5.w2.weight'),
    ('gpt_oss', 'per_expert', 'experts.0.up_proj.bias'),
    ('mixtral', 'stacked', 'experts.down_proj'),
    ('gpt_oss', 'stacked', 'experts.down_proj_bias'),
    ('gpt_oss', 'stacked', 'router.bias'),
    ('qwen2_moe', 'stacked', 'shared_expert_gate.weight'),
    ('deepseek_v3', 'per_expert', 'shared_experts.up_proj.weight'),
    ('deepseek_v3', 'stacked', 'gate.e_score_correction_bias'),
    ('olmoe', 'stacked', 'gate.weight'),
    ('mixtral', 'per_expert', 'gate.weight'),
  ],
)
def test_missing_key_is_named(name, key_format, key):
  case = REFERENCE[name]
  prefix = case['prefix'] if key_format == 'per_expert' else ''
  sd = _state_dict(name, key_format)
  del sd[prefix + key]
  with pytest.raises(ValueError, match='missing key') as info:
    _parse(name, key_format, sd)
  assert repr(prefix + key) in str(info.value)
  # Only what is missing is named, not the keys of the other format.
  assert 'gate_up_proj' not in str(info.value).split('It has keys')[0]


def test_missing_last_expert_names_its_keys():
  """Without expert 7's keys the error names them (the router's 8 rows say
  how many experts there are; it used to blame the router's shape)."""
  case = REFERENCE['olmoe']
  sd = {
    k: v
    for k, v in _state_dict('olmoe', 'per_expert').items()
    if '.experts.7.' not in k
  }
  with pytest.raises(ValueError, match=r'8 experts.*missing key.*experts\.7\.'):
    parse_moe_state_dict(
      sd, layout='olmoe', prefix=case['prefix'], config=case['config']
    )


def test_unexpected_key_is_an_error_unless_not_strict():
  sd = _state_dict('qwen3_moe')
  sd['experts.extra_scale'] = np.ones(8, np.float32)
  with pytest.raises(ValueError, match=r"unexpected key\(s\) \['experts.extra"):
    _parse('qwen3_moe', 'stacked', sd)
  assert _parse('qwen3_moe', 'stacked', sd, strict=False).num_experts == 8


def test_keys_outside_the_prefix_are_ignored():
  case = REFERENCE['mixtral']
  sd = dict(
    case['per_expert'], **{'model.embed_tokens.weight': np.ones((4, 16))}
  )
  t = parse_moe_state_dict(
    sd, layout='mixtral', prefix=case['prefix'][:-1], config=case['config']
  )
  assert t.key_format == 'per_expert'


@pytest.mark.parametrize(
  ('name', 'layout', 'match'),
  [
    ('qwen2_moe', 'qwen3_moe', "unexpected.*match layout 'qwen2_moe'"),
    ('gpt_oss', 'mixtral', "missing.*'gate.weight'.*match layout 'gpt_oss'"),
    ('deepseek_v3', 'olmoe', "match layout 'deepseek_v3'"),
  ],
)
def test_keys_of_another_layout_are_named(name, layout, match):
  with pytest.raises(ValueError, match=match):
    parse_moe_state_dict(
      _state_dict(name), layout=layout, config=dict(num_experts_per_tok=2)
    )


def test_prefixed_keys_suggest_prefix():
  case = REFERENCE['mixtral']
  with pytest.raises(ValueError, match=f"pass prefix='{case['prefix']}'"):
    parse_moe_state_dict(
      case['per_expert'], layout='mixtral', config=case['config']
    )


def test_mixed_formats_and_quantized_checkpoints_are_errors():
  sd = dict(_state_dict('olmoe'))
  sd['experts.0.gate_proj.weight'] = np.ones((12, 16), np.float32)
  with pytest.raises(ValueError, match='mixes stacked expert keys'):
    parse_moe_state_dict(sd, layout='olmoe', config=dict(num_experts_per_tok=2))
  mxfp4 = {
    'router.weight': np.ones((8, 16)),
    'router.bias': np.ones(8),
    'experts.gate_up_proj_blocks': np.ones((8, 24, 1, 16), np.uint8),
    'experts.gate_up_proj_scales': np.ones((8, 24, 1), np.uint8),
  }
  with pytest.raises(ValueError, match=r'MXFP4.*dequantize'):
    parse_moe_state_dict(mxfp4, layout='gpt_oss')


def _transposed(name, key_format, key):
  case = REFERENCE[name]
  prefix = case['prefix'] if key_format == 'per_expert' else ''
  sd = _state_dict(name, key_format)
  sd[prefix + key] = np.swapaxes(sd[prefix + key], -1, -2)
  return lambda: parse_moe_state_dict(
    sd, layout=name, prefix=prefix, config=case['config']
  )


@pytest.mark.parametrize(
  ('name', 'key_format', 'key'),
  [
    ('mixtral', 'per_expert', 'experts.3.w2.weight'),
    ('mixtral', 'per_expert', 'experts.0.w1.weight'),
    ('qwen3_moe', 'per_expert', 'experts.2.up_proj.weight'),
    ('olmoe', 'stacked', 'experts.down_proj'),
    ('gpt_oss', 'stacked', 'experts.down_proj'),
    ('qwen2_moe', 'stacked', 'shared_expert.down_proj.weight'),
    ('qwen2_moe', 'stacked', 'gate.weight'),
  ],
)
def test_transposed_weight_is_flagged(name, key_format, key):
  with pytest.raises(ValueError, match=r'has shape.*It looks transposed'):
    _transposed(name, key_format, key)()


def test_stacked_orientation_of_the_other_family_is_named():
  with pytest.raises(ValueError, match="GPT-OSS's \\(E, in, 2 \\* hidden\\)"):
    _transposed('mixtral', 'stacked', 'experts.gate_up_proj')()
  with pytest.raises(ValueError, match='orientation of the other layouts'):
    _transposed('gpt_oss', 'stacked', 'experts.gate_up_proj')()


def test_inconsistent_expert_counts():
  sd = _state_dict('qwen3_moe')
  sd['experts.down_proj'] = sd['experts.down_proj'][:7]
  with pytest.raises(
    ValueError, match=r'experts.down_proj.*expected \(8, _, 12\)'
  ):
    parse_moe_state_dict(
      sd, layout='qwen3_moe', config=dict(num_experts_per_tok=2)
    )
  sd = _state_dict('deepseek_v3')
  sd['gate.e_score_correction_bias'] = np.zeros(6, np.float32)
  with pytest.raises(ValueError, match=r'e_score_correction_bias.*\(8,\)'):
    _parse('deepseek_v3', 'stacked', sd)


def test_bad_arguments_are_type_errors():
  with pytest.raises(TypeError, match='state_dict must be a mapping'):
    parse_moe_state_dict([1, 2], layout='mixtral')
  with pytest.raises(TypeError, match='config must be a transformers config'):
    _parse('mixtral', 'stacked', config='config.json')
  sd = _state_dict('olmoe')
  sd['gate.weight'] = sd['gate.weight'].astype(np.int32)
  with pytest.raises(ValueError, match='must be floating point'):
    parse_moe_state_dict(sd, layout='olmoe', config=dict(num_experts_per_tok=2))


# --------------------------------------------------------------------------
# Tensors and dtypes; torch is never imported
# --------------------------------------------------------------------------
class _FakeTensor:
  """Stands in for a torch tensor: detach/cpu/numpy, and float for bf16."""

  def __init__(self, value: np.ndarray, dtype: str = 'torch.float32'):
    self.value, self.dtype = value, dtype

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    if self.dtype == 'torch.bfloat16':
      raise TypeError('Got unsupported ScalarType BFloat16')
    return self.value

  def float(self):
    return _FakeTensor(self.value.astype(np.float32))


def test_torch_like_tensors_keep_bfloat16():
  case = REFERENCE['deepseek_v3']
  sd = {
    k: _FakeTensor(v.astype(ml_dtypes.bfloat16), 'torch.bfloat16')
    for k, v in case['per_expert'].items()
  }
  t = parse_moe_state_dict(
    sd, layout='deepseek_v3', prefix=case['prefix'], config=case['config']
  )
  assert t.param_dtype == jnp.bfloat16
  assert t.params['gate_proj']['kernel'].dtype == jnp.bfloat16
  assert t.score_correction_bias.dtype == np.float32
  want = case['stacked']['experts.gate_up_proj'][:, :12].transpose(0, 2, 1)
  np.testing.assert_array_equal(
    t.params['gate_proj']['kernel'], want.astype(ml_dtypes.bfloat16)
  )


def test_param_dtype_casts():
  t = _parse('gpt_oss', 'stacked', param_dtype=jnp.bfloat16)
  leaves = [t.params['router']['bias'], t.params['down_proj']['kernel']]
  assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)


def test_torch_is_never_imported(monkeypatch):
  """With ``import torch`` made to fail, the modules import and parse."""
  monkeypatch.setitem(sys.modules, 'torch', None)
  for short in ('moe_layouts', 'moe_arrays', 'moe_settings'):
    # Teardown restores both the module entries and the package attributes.
    monkeypatch.setattr(torch_pkg, short, getattr(torch_pkg, short))
    monkeypatch.delitem(sys.modules, f'flaxact._src.interop.torch.{short}')
  fresh = importlib.import_module('flaxact._src.interop.torch.moe_layouts')
  assert fresh is not moe_layouts
  case = REFERENCE['gpt_oss']
  t = fresh.parse_moe_state_dict(
    case['stacked'], layout='gpt_oss', config=case['config']
  )
  assert t.num_experts == 8
