"""Tests of PyTorch weight import: the state-dict reader and ``from_torch``.

torch is not needed: the reference weights, inputs and PyTorch outputs come
from ``tests/data/torch_reference.npz``, written by
``tests/data/make_torch_reference.py`` (see its docstring to regenerate it).
Torch tensors are stood in for by small classes with torch's conversion
methods.
"""

from __future__ import annotations

import pathlib
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src import torch_import
from flaxact._src.torch_import import parse_state_dict
from tests import helpers

DATA = pathlib.Path(__file__).parent / 'data' / 'torch_reference.npz'


def _load_reference() -> dict[str, dict]:
  cases: dict[str, dict] = {}
  with np.load(DATA) as data:
    for key in data.files:
      if key == 'torch_version':
        continue
      name, field = key.split('.', 1)
      case = cases.setdefault(name, {'sd': {}})
      if field.startswith('sd.'):
        case['sd'][field[3:]] = data[key]
      elif field in ('layout', 'activation'):
        case[field] = str(data[key])
      else:
        case[field] = data[key]
  return cases


REFERENCE = _load_reference()
CASE_NAMES = sorted(REFERENCE)


def _kwargs(case: dict) -> dict:
  return dict(layout=case['layout'], activation=case['activation'] or None)


# float64 numpy versions of the activations the layouts use.
_NP_ACT = {
  'silu': lambda x: x / (1 + np.exp(-x)),
  'relu': lambda x: np.maximum(x, 0),
  'gelu': lambda x: 0.5 * x * special.erfc(-x / np.sqrt(2)),
  'gelu_tanh': lambda x: (
    0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  ),
  'gelu_pytorch_tanh': lambda x: _NP_ACT['gelu_tanh'](x),
}


def _numpy_forward(ffn: torch_import.TorchFFN, x: np.ndarray) -> np.ndarray:
  """The FFN computed from the parsed weights in float64 numpy."""
  p = {
    k: {n: np.asarray(v, np.float64) for n, v in d.items()}
    for k, d in ffn.params().items()
  }

  def dense(name, h):
    y = h @ p[name]['kernel']
    return y + p[name]['bias'] if 'bias' in p[name] else y

  assert isinstance(ffn.activation, str)
  act = _NP_ACT[ffn.activation]
  x = np.asarray(x, np.float64)
  if ffn.gated:
    h = act(dense('gate_proj', x)) * dense('up_proj', x)
  else:
    h = act(dense('up_proj', x))
  return dense('down_proj', h)


class FakeTensor:
  """Stands in for a ``torch.Tensor``: ``detach``, ``cpu``, ``numpy``."""

  def __init__(self, array, dtype: str = 'torch.float32'):
    self._array = np.asarray(array)
    self.dtype = dtype
    self.calls: list[str] = []

  def detach(self):
    self.calls.append('detach')
    return self

  def cpu(self):
    self.calls.append('cpu')
    return self

  def numpy(self):
    self.calls.append('numpy')
    if self.dtype in ('torch.bfloat16', 'torch.qint8'):  # as torch does
      raise TypeError(f'Got unsupported ScalarType {self.dtype}')
    return self._array

  def float(self):
    self.calls.append('float')
    return FakeTensor(self._array.astype(np.float32))


def _llama_sd(d=4, h=6, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'gate_proj.weight': rng.normal(size=(h, d)).astype(dtype),
    'up_proj.weight': rng.normal(size=(h, d)).astype(dtype),
    'down_proj.weight': rng.normal(size=(d, h)).astype(dtype),
  }


# --- the state-dict reader against the PyTorch reference ---------------------


def test_reference_file_has_every_layout():
  layouts = {REFERENCE[name]['layout'] for name in CASE_NAMES}
  assert layouts == set(torch_import.LAYOUTS)


@pytest.mark.parametrize('name', CASE_NAMES)
def test_parsed_weights_reproduce_torch_outputs(name):
  case = REFERENCE[name]
  ffn = parse_state_dict(case['sd'], **_kwargs(case))
  y = _numpy_forward(ffn, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))


@pytest.mark.parametrize(
  'name, gated, sizes, use_bias',
  [
    ('llama', True, (8, 12, 8), False),
    ('llama_bias', True, (8, 12, 8), True),
    ('t5', False, (8, 12, 8), False),
    ('t5_gated', True, (8, 12, 8), False),
    ('gpt2', False, (8, 16, 8), True),
    ('bert', False, (8, 12, 8), True),
    ('phi3', True, (8, 12, 8), False),
  ],
)
def test_parsed_description(name, gated, sizes, use_bias):
  ffn = parse_state_dict(
    REFERENCE[name]['sd'], layout=REFERENCE[name]['layout']
  )
  assert ffn.gated is gated
  assert (ffn.in_features, ffn.hidden_features, ffn.out_features) == sizes
  assert ffn.use_bias is use_bias
  d, h, out = sizes
  assert ffn.kernels['up_proj'].shape == (d, h)
  assert ffn.kernels['down_proj'].shape == (h, out)
  assert ('gate_proj' in ffn.kernels) is gated
  assert ffn.param_dtype == np.float32


def test_phi3_gate_rows_come_first():
  w = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # hidden 2, d 3
  down = np.zeros((3, 2), np.float32)
  ffn = parse_state_dict(
    {'gate_up_proj.weight': w, 'down_proj.weight': down}, layout='phi3'
  )
  np.testing.assert_array_equal(ffn.kernels['gate_proj'], w[:2].T)
  np.testing.assert_array_equal(ffn.kernels['up_proj'], w[2:].T)


def test_gpt2_conv1d_weights_are_not_transposed():
  rng = np.random.default_rng(0)
  sd = {
    'c_fc.weight': rng.normal(size=(3, 5)).astype(np.float32),
    'c_fc.bias': np.zeros(5, np.float32),
    'c_proj.weight': rng.normal(size=(5, 3)).astype(np.float32),
    'c_proj.bias': np.zeros(3, np.float32),
  }
  ffn = parse_state_dict(sd, layout='gpt2')
  np.testing.assert_array_equal(ffn.kernels['up_proj'], sd['c_fc.weight'])
  np.testing.assert_array_equal(ffn.kernels['down_proj'], sd['c_proj.weight'])


def test_layout_defaults_and_activation_override():
  expected = {
    'llama': 'silu',
    't5': 'relu',
    't5_gated': 'gelu_tanh',
    'gpt2': 'gelu_tanh',
    'bert': 'gelu',
    'phi3': 'silu',
  }
  for name in CASE_NAMES:
    case = REFERENCE[name]
    if not case['activation']:
      ffn = parse_state_dict(case['sd'], layout=case['layout'])
      assert ffn.activation == expected[case['layout']], name
  ffn = parse_state_dict(_llama_sd(), layout='llama', activation='gelu_new')
  assert ffn.activation == 'gelu_new'


def test_layout_name_is_normalised():
  ffn = parse_state_dict(REFERENCE['t5_gated']['sd'], layout='T5-Gated')
  assert ffn.layout == 't5_gated'


def test_bert_layernorm_keys_are_ignored_not_loaded():
  sd = REFERENCE['bert']['sd']
  assert 'output.LayerNorm.weight' in sd
  ffn = parse_state_dict(sd, layout='bert')
  assert set(ffn.params()) == {'up_proj', 'down_proj'}


# --- prefixes, extra keys ----------------------------------------------------


def _in_a_model(sd: dict, layer: int = 0) -> dict:
  """``sd`` as it appears in a whole model's state dict, with neighbours."""
  rng = np.random.default_rng(1)
  full = {'model.embed_tokens.weight': rng.normal(size=(10, 4))}
  for i in range(12):
    full[f'model.layers.{i}.self_attn.q_proj.weight'] = rng.normal(size=(4, 4))
    other = _llama_sd(seed=i + 10) if i != layer else sd
    for key, value in other.items():
      full[f'model.layers.{i}.mlp.{key}'] = value
  return full


@pytest.mark.parametrize(
  'prefix', ['model.layers.1.mlp.', 'model.layers.1.mlp']
)
def test_prefix_selects_one_layer(prefix):
  sd = _llama_sd(seed=3)
  ffn = parse_state_dict(
    _in_a_model(sd, layer=1), layout='llama', prefix=prefix
  )
  np.testing.assert_array_equal(
    ffn.kernels['gate_proj'], sd['gate_proj.weight'].T
  )


def test_unexpected_keys_raise_naming_them():
  sd = {**_llama_sd(), 'act_fn.alpha': np.ones(1, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'act_fn\.alpha'"):
    parse_state_dict(sd, layout='llama')


def test_unexpected_keys_under_a_prefix_raise():
  full = _in_a_model(_llama_sd())
  # 'model.layers.1' would also catch 'model.layers.1x'; the '.' is added.
  full['model.layers.0.mlp.extra.weight'] = np.zeros((2, 2))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.extra"):
    parse_state_dict(full, layout='llama', prefix='model.layers.0.mlp')


def test_strict_false_ignores_unexpected_keys():
  sd = {**_llama_sd(), 'act_fn.alpha': np.ones(1, np.float32)}
  ffn = parse_state_dict(sd, layout='llama', strict=False)
  assert set(ffn.kernels) == {'gate_proj', 'up_proj', 'down_proj'}


def test_bias_keys_not_in_the_layout_are_unexpected():
  sd = {**REFERENCE['t5']['sd'], 'wi.bias': np.zeros(12, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'wi\.bias'"):
    parse_state_dict(sd, layout='t5')


# --- errors -------------------------------------------------------------------


def test_unknown_layout_lists_valid_ones():
  with pytest.raises(ValueError, match='unknown layout') as err:
    parse_state_dict(_llama_sd(), layout='mixtral')
  for name in torch_import.LAYOUTS:
    assert repr(name) in str(err.value)


def test_unknown_layout_suggests_close_name():
  with pytest.raises(ValueError, match="Did you mean 'llama'"):
    parse_state_dict(_llama_sd(), layout='lama')


def test_non_string_layout_raises_value_error():
  with pytest.raises(ValueError, match='layout must be one of'):
    parse_state_dict(_llama_sd(), layout=None)  # type: ignore[arg-type]


def test_missing_key_is_named():
  sd = _llama_sd()
  del sd['up_proj.weight']
  with pytest.raises(ValueError, match=r"missing key.*'up_proj\.weight'"):
    parse_state_dict(sd, layout='llama')


def test_missing_bias_names_key_and_layout():
  sd = dict(REFERENCE['gpt2']['sd'])
  del sd['c_proj.bias']
  with pytest.raises(ValueError, match=r"'gpt2'.*missing.*'c_proj\.bias'"):
    parse_state_dict(sd, layout='gpt2')


def test_partial_llama_biases_raise():
  sd = {**_llama_sd(), 'gate_proj.bias': np.zeros(6, np.float32)}
  with pytest.raises(ValueError, match='bias on every projection or on none'):
    parse_state_dict(sd, layout='llama')


def test_missing_keys_suggest_a_prefix():
  full = _in_a_model(_llama_sd())
  with pytest.raises(ValueError, match=r"prefix='model\.layers\.\d+\.mlp\.'"):
    parse_state_dict(full, layout='llama')


def test_missing_keys_suggest_the_matching_layout():
  with pytest.raises(ValueError, match="match layout 't5_gated'"):
    parse_state_dict(REFERENCE['t5_gated']['sd'], layout='t5')


def test_mismatched_gate_and_up_shapes():
  sd = _llama_sd()
  sd['up_proj.weight'] = np.zeros((6, 5), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'up_proj\.weight'\] has shape \(6, 5\); expected \(6, 4\)",
  ):
    parse_state_dict(sd, layout='llama')


def test_down_proj_must_take_the_hidden_size():
  sd = _llama_sd()
  sd['down_proj.weight'] = np.zeros((4, 7), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'down_proj\.weight'\] has shape \(4, 7\); expected"
    r' \(out_features, 6\): its input size must equal the hidden size 6',
  ):
    parse_state_dict(sd, layout='llama')


def test_conv1d_shape_error_is_in_stored_orientation():
  sd = dict(REFERENCE['gpt2']['sd'])
  sd['c_proj.weight'] = np.zeros((8, 16), np.float32)  # nn.Linear's (out, in)
  with pytest.raises(
    ValueError,
    match=r"'c_proj\.weight'\] has shape \(8, 16\); expected"
    r" \(16, out_features\).*looks transposed: layout 'gpt2' stores it"
    r' \(in, out\) as Conv1D',
  ):
    parse_state_dict(sd, layout='gpt2')


def test_wrong_bias_shape():
  sd = dict(REFERENCE['bert']['sd'])
  sd['intermediate.dense.bias'] = np.zeros(8, np.float32)
  with pytest.raises(
    ValueError,
    match=r"'intermediate\.dense\.bias'\] has shape \(8,\); expected \(12,\)",
  ):
    parse_state_dict(sd, layout='bert')


def test_weight_must_be_a_matrix():
  sd = _llama_sd()
  sd['gate_proj.weight'] = np.zeros(24, np.float32)
  with pytest.raises(ValueError, match=r"'gate_proj\.weight'\] must be a 2-D"):
    parse_state_dict(sd, layout='llama')


def test_phi3_fused_rows_must_be_even():
  sd = {
    'gate_up_proj.weight': np.zeros((5, 4), np.float32),
    'down_proj.weight': np.zeros((4, 2), np.float32),
  }
  with pytest.raises(ValueError, match=r"'gate_up_proj\.weight'.*even"):
    parse_state_dict(sd, layout='phi3')


def test_integer_weights_raise():
  sd = _llama_sd()
  sd['down_proj.weight'] = np.zeros((4, 6), np.int32)
  with pytest.raises(ValueError, match=r"'down_proj\.weight'.*floating point"):
    parse_state_dict(sd, layout='llama')


def test_unknown_activation_raises_value_error():
  with pytest.raises(ValueError, match='unknown activation'):
    parse_state_dict(_llama_sd(), layout='llama', activation='gelu_fancy')


def test_state_dict_must_be_a_mapping():
  with pytest.raises(TypeError, match='state_dict must be a mapping'):
    parse_state_dict(list(_llama_sd().items()), layout='llama')  # type: ignore[arg-type]


# --- tensors and dtypes -------------------------------------------------------


def test_torch_like_tensors_are_converted_without_torch():
  sd = _llama_sd()
  fakes = {k: FakeTensor(v) for k, v in sd.items()}
  ffn = parse_state_dict(fakes, layout='llama')
  for key, fake in fakes.items():
    assert fake.calls == ['detach', 'cpu', 'numpy'], key
  np.testing.assert_array_equal(ffn.kernels['up_proj'], sd['up_proj.weight'].T)
  assert 'torch' not in sys.modules


def test_bfloat16_tensors_stay_bfloat16():
  sd = _llama_sd()
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in sd.items()}
  fakes = {
    k: FakeTensor(v.astype(np.float32), dtype='torch.bfloat16')
    for k, v in bf16.items()
  }
  ffn = parse_state_dict(fakes, layout='llama')
  assert ffn.param_dtype == jnp.bfloat16
  for name, kernel in ffn.kernels.items():
    assert kernel.dtype == jnp.bfloat16
    key = f'{name}.weight'
    np.testing.assert_array_equal(kernel, bf16[key].T)


def test_unrepresentable_dtype_without_counterpart_raises():
  sd = {
    k: FakeTensor(v, dtype='torch.bfloat16') for k, v in _llama_sd().items()
  }
  sd['up_proj.weight'].dtype = 'torch.qint8'
  with pytest.raises(ValueError, match=r"'up_proj\.weight'.*'qint8'"):
    parse_state_dict(sd, layout='llama')


def test_dtype_is_kept_or_cast():
  sd = _llama_sd(dtype=np.float16)
  assert parse_state_dict(sd, layout='llama').param_dtype == np.float16
  ffn = parse_state_dict(sd, layout='llama', param_dtype=jnp.bfloat16)
  assert ffn.param_dtype == jnp.bfloat16
  assert all(k.dtype == jnp.bfloat16 for k in ffn.kernels.values())


def test_mixed_dtypes_promote():
  sd = _llama_sd()
  sd['up_proj.weight'] = sd['up_proj.weight'].astype(jnp.bfloat16)
  ffn = parse_state_dict(sd, layout='llama')
  assert ffn.param_dtype == np.float32


# --- from_torch in Linen and NNX ----------------------------------------------

GATED_CASES = [
  n
  for n in CASE_NAMES
  if REFERENCE[n]['layout'] in ('llama', 't5_gated', 'phi3')
]


def _linen_apply(layer, variables, x):
  with jax.default_matmul_precision('highest'):
    return np.asarray(layer.apply(variables, jnp.asarray(x)))


def _nnx_apply(layer, x):
  with jax.default_matmul_precision('highest'):
    return np.asarray(layer(jnp.asarray(x)))


@pytest.mark.parametrize('name', CASE_NAMES)
def test_linen_matches_torch(name):
  case = REFERENCE[name]
  layer, variables = fl.from_torch(case['sd'], **_kwargs(case))
  y = _linen_apply(layer, variables, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))


@pytest.mark.parametrize('name', CASE_NAMES)
def test_nnx_matches_torch(name):
  case = REFERENCE[name]
  layer = fx.from_torch(case['sd'], **_kwargs(case))
  y = _nnx_apply(layer, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))


@pytest.mark.parametrize('name', CASE_NAMES)
def test_linen_and_nnx_agree_exactly(name):
  case = REFERENCE[name]
  layer, variables = fl.from_torch(case['sd'], **_kwargs(case))
  nnx_layer = fx.from_torch(case['sd'], **_kwargs(case))
  np.testing.assert_array_equal(
    _linen_apply(layer, variables, case['x']), _nnx_apply(nnx_layer, case['x'])
  )


@pytest.mark.parametrize('name', GATED_CASES)
def test_fused_gate_up_matches_torch(name):
  # The fused (in, 2, hidden) matmul rounds differently from two (in, hidden)
  # ones on XLA:CPU (by about 1 ulp), so it is held to the torch reference
  # within TOL, and Linen and NNX agree exactly with each other.
  case = REFERENCE[name]
  layer, variables = fl.from_torch(
    case['sd'], fused_gate_up=True, **_kwargs(case)
  )
  assert set(variables['params']) == {'gate_up_proj', 'down_proj'}
  y = _linen_apply(layer, variables, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))
  nnx_layer = fx.from_torch(case['sd'], fused_gate_up=True, **_kwargs(case))
  assert nnx_layer.gate_proj is None and nnx_layer.up_proj is None
  np.testing.assert_array_equal(_nnx_apply(nnx_layer, case['x']), y)


FRAMEWORKS = {
  'linen': lambda sd, **kw: fl.from_torch(sd, **kw)[0],
  'nnx': fx.from_torch,
}


@pytest.mark.parametrize(
  'name, linen_cls, nnx_cls',
  [
    ('llama', fl.GatedFFN, fx.GatedFFN),
    ('t5', fl.FFN, fx.FFN),
    ('t5_gated', fl.GatedFFN, fx.GatedFFN),
    ('gpt2', fl.FFN, fx.FFN),
    ('bert', fl.FFN, fx.FFN),
    ('phi3', fl.GatedFFN, fx.GatedFFN),
  ],
)
def test_layer_classes_and_weights(name, linen_cls, nnx_cls):
  case = REFERENCE[name]
  ffn = parse_state_dict(case['sd'], layout=case['layout'])
  layer, variables = fl.from_torch(case['sd'], layout=case['layout'])
  assert type(layer) is linen_cls
  assert layer.activation == ffn.activation
  assert layer.use_bias is ffn.use_bias
  assert layer.hidden_features == ffn.hidden_features
  # The same tree as layer.init's, logical-axis boxes included.
  init = layer.init(jax.random.key(0), jnp.asarray(case['x']))
  assert jax.tree.structure(variables) == jax.tree.structure(init)
  assert nn.get_partition_spec(variables) == nn.get_partition_spec(init)
  chex.assert_trees_all_equal(nn.unbox(variables)['params'], ffn.params())
  nnx_layer = fx.from_torch(case['sd'], layout=case['layout'])
  assert type(nnx_layer) is nnx_cls
  state = nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))
  chex.assert_trees_all_equal(state, ffn.params())


def test_prefix_and_strict_reach_the_builders():
  sd = REFERENCE['llama']['sd']
  full = {f'model.layers.3.mlp.{k}': v for k, v in sd.items()}
  full['model.layers.3.input_layernorm.weight'] = np.ones(8, np.float32)
  x = REFERENCE['llama']['x']
  layer, variables = fl.from_torch(
    full, layout='llama', prefix='model.layers.3.mlp'
  )
  want = _linen_apply(*fl.from_torch(sd, layout='llama'), x)
  np.testing.assert_array_equal(_linen_apply(layer, variables, x), want)
  extra = {**sd, 'act.weight': np.ones(1, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'act\.weight'"):
    fx.from_torch(extra, layout='llama')
  nnx_layer = fx.from_torch(extra, layout='llama', strict=False)
  np.testing.assert_array_equal(_nnx_apply(nnx_layer, x), want)


@pytest.mark.parametrize('framework', sorted(FRAMEWORKS))
def test_builder_errors_name_the_problem(framework):
  build = FRAMEWORKS[framework]
  sd = dict(REFERENCE['llama']['sd'])
  with pytest.raises(ValueError, match="unknown layout 'gpt3'"):
    build(sd, layout='gpt3')
  with pytest.raises(ValueError, match=r"missing key.*'down_proj\.weight'"):
    build(
      {k: v for k, v in sd.items() if k != 'down_proj.weight'}, layout='llama'
    )
  bad = {**sd, 'up_proj.weight': np.zeros((13, 8), np.float32)}
  with pytest.raises(
    ValueError,
    match=r"'up_proj\.weight'\] has shape \(13, 8\); expected \(12, 8\)",
  ):
    build(bad, layout='llama')
  with pytest.raises(ValueError, match='fused_gate_up=True needs a gated'):
    build(REFERENCE['t5']['sd'], layout='t5', fused_gate_up=True)
  with pytest.raises(TypeError, match='sets hidden_features, use_bias'):
    build(sd, layout='llama', use_bias=True, hidden_features=3)


def test_learnable_activation_modules_are_rejected():
  sd = REFERENCE['llama']['sd']
  with pytest.raises(TypeError, match='PReLU module has parameters'):
    fl.from_torch(sd, layout='llama', activation=fl.PReLU())
  with pytest.raises(TypeError, match='PReLU module has parameters'):
    fx.from_torch(sd, layout='llama', activation=fx.PReLU())


def test_layer_options_are_passed_on():
  case = REFERENCE['t5_gated']
  x = jnp.asarray(case['x'])
  layer, variables = fl.from_torch(
    case['sd'], layout='t5_gated', dtype=jnp.bfloat16
  )
  assert layer.apply(variables, x).dtype == jnp.bfloat16
  nnx_layer = fx.from_torch(
    case['sd'], layout='t5_gated', remat=False, dtype=jnp.bfloat16
  )
  assert nnx_layer.remat is False
  assert nnx_layer(x).dtype == jnp.bfloat16


def test_dropout_in_linen():
  case = REFERENCE['gpt2']
  x = jnp.asarray(case['x'])
  layer, variables = fl.from_torch(case['sd'], layout='gpt2', dropout_rate=0.5)
  y_eval = layer.apply(variables, x, deterministic=True)
  np.testing.assert_allclose(y_eval, case['y'], **helpers.tol(jnp.float32))
  y_train = layer.apply(
    variables, x, deterministic=False, rngs={'dropout': jax.random.key(1)}
  )
  assert not np.allclose(y_train, y_eval)


def test_dropout_in_nnx_uses_the_given_rngs():
  case = REFERENCE['gpt2']
  x = jnp.asarray(case['x'])
  layer = fx.from_torch(
    case['sd'],
    layout='gpt2',
    dropout_rate=0.5,
    rngs=nnx.Rngs(params=0, dropout=1),
  )
  y_train = layer(x)
  with jax.default_matmul_precision('highest'):
    y_eval = layer(x, deterministic=True)
  np.testing.assert_allclose(y_eval, case['y'], **helpers.tol(jnp.float32))
  assert not np.allclose(y_train, y_eval)
  # Without rngs there is no dropout stream: training mode says so.
  no_rngs = fx.from_torch(case['sd'], layout='gpt2', dropout_rate=0.5)
  with pytest.raises(ValueError, match='needs an rng'):
    no_rngs(x)


def test_bfloat16_checkpoint_gives_bfloat16_layers():
  case = REFERENCE['llama']
  fakes = {
    k: FakeTensor(v.astype(jnp.bfloat16).astype(np.float32), 'torch.bfloat16')
    for k, v in case['sd'].items()
  }
  x = jnp.asarray(case['x'], jnp.bfloat16)
  layer, variables = fl.from_torch(fakes, layout='llama')
  for leaf in jax.tree.leaves(nn.unbox(variables)):
    assert leaf.dtype == jnp.bfloat16
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  # bf16 weights and input against the float32 torch output.
  np.testing.assert_allclose(
    np.asarray(y, np.float32), case['y'], rtol=5e-2, atol=5e-2
  )
  nnx_layer = fx.from_torch(fakes, layout='llama')
  assert nnx_layer.down_proj.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(nnx_layer(x), y)
  f32_layer = fx.from_torch(fakes, layout='llama', param_dtype=jnp.float32)
  assert f32_layer.down_proj.kernel[...].dtype == jnp.float32


def test_builders_do_not_import_torch():
  assert 'torch' not in sys.modules
