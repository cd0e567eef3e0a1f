"""The state-dict reader's errors: each names the key, the shapes and, where
the shapes show it, that the weights look transposed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.interop.torch.layouts import LAYOUTS
from flaxact._src.interop.torch.state_dict import parse_state_dict
from tests.torch_helpers import REFERENCE, FakeTensor, in_a_model, llama_sd


def test_unknown_layout_lists_valid_ones():
  with pytest.raises(ValueError, match='unknown layout') as err:
    parse_state_dict(llama_sd(), layout='mixtral')
  for name in LAYOUTS:
    assert repr(name) in str(err.value)


def test_unknown_layout_suggests_close_name():
  with pytest.raises(ValueError, match="Did you mean 'llama'"):
    parse_state_dict(llama_sd(), layout='lama')


def test_non_string_layout_raises_value_error():
  with pytest.raises(ValueError, match='layout must be one of'):
    parse_state_dict(llama_sd(), layout=None)  # type: ignore[arg-type]


def test_missing_key_is_named():
  sd = llama_sd()
  del sd['up_proj.weight']
  with pytest.raises(ValueError, match=r"missing key.*'up_proj\.weight'"):
    parse_state_dict(sd, layout='llama')


def test_missing_bias_names_key_and_layout():
  sd = dict(REFERENCE['gpt2']['sd'])
  del sd['c_proj.bias']
  with pytest.raises(ValueError, match=r"'gpt2'.*missing.*'c_proj\.bias'"):
    parse_state_dict(sd, layout='gpt2')


def test_partial_llama_biases_raise():
  sd = {**llama_sd(), 'gate_proj.bias': np.zeros(6, np.float32)}
  with pytest.raises(ValueError, match='bias on every projection or on none'):
    parse_state_dict(sd, layout='llama')


def test_missing_keys_suggest_a_prefix():
  with pytest.raises(ValueError, match=r"prefix='model\.layers\.\d+\.mlp\.'"):
    parse_state_dict(in_a_model(llama_sd()), layout='llama')


def test_missing_keys_suggest_the_matching_layout():
  with pytest.raises(ValueError, match="match layout 't5_gated'"):
    parse_state_dict(REFERENCE['t5_gated']['sd'], layout='t5')
  # gpt2 requires biases; unbiased nn.Linear weights with its keys are
  # starcoder2's (an alias with the same keys is never suggested).
  sd = {
    k: v for k, v in REFERENCE['starcoder2']['sd'].items() if 'bias' not in k
  }
  with pytest.raises(ValueError, match="match layout 'starcoder2'"):
    parse_state_dict(sd, layout='gpt2')


def test_mismatched_gate_and_up_shapes():
  sd = llama_sd()
  sd['up_proj.weight'] = np.zeros((6, 5), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'up_proj\.weight'\] has shape \(6, 5\); expected \(6, 4\)",
  ) as err:
    parse_state_dict(sd, layout='llama')
  assert 'transposed' not in str(err.value)


def test_transposed_up_next_to_the_gate_is_flagged():
  sd = llama_sd()
  sd['up_proj.weight'] = sd['up_proj.weight'].T.copy()
  with pytest.raises(
    ValueError, match=r'\(4, 6\); expected \(6, 4\).*looks transposed'
  ):
    parse_state_dict(sd, layout='llama')


def test_down_proj_must_take_the_hidden_size():
  sd = llama_sd()
  sd['down_proj.weight'] = np.zeros((4, 7), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'down_proj\.weight'\] has shape \(4, 7\); expected"
    r' \(out_features, 6\): its input size must equal the hidden size 6',
  ) as err:
    parse_state_dict(sd, layout='llama')
  assert 'transposed' not in str(err.value)


def test_one_transposed_conv1d_matrix_is_flagged():
  sd = dict(REFERENCE['gpt2']['sd'])
  sd['c_proj.weight'] = np.zeros((8, 16), np.float32)  # nn.Linear's (out, in)
  with pytest.raises(
    ValueError,
    match=r"'c_proj\.weight'\] has shape \(8, 16\); expected"
    r' \(16, out_features\).*looks transposed: the layout stores it'
    r' \(in, out\) as Conv1D',
  ):
    parse_state_dict(sd, layout='gpt2')


def test_starcoder2_weights_in_the_gpt2_layout_say_which_layout():
  """The issue's case: nn.Linear c_fc/c_proj read as GPT-2's Conv1D."""
  with pytest.raises(
    ValueError,
    match=r"'c_fc\.bias'\] has shape \(16,\); expected \(8,\).*The weights"
    r" look transposed: layout 'gpt2' stores them \(in, out\) as Conv1D;"
    r" weights stored the other way are layout 'starcoder2'",
  ):
    parse_state_dict(REFERENCE['starcoder2']['sd'], layout='gpt2')
  with pytest.raises(ValueError, match="other way are layout 'gpt2'"):
    parse_state_dict(REFERENCE['gpt2']['sd'], layout='starcoder2')


@pytest.mark.parametrize('name', ['llama_bias', 'bert'])
def test_flax_oriented_kernels_are_flagged(name):
  """Every weight transposed (Flax kernels passed as torch weights)."""
  case = REFERENCE[name]
  sd = {k: (v.T.copy() if v.ndim == 2 else v) for k, v in case['sd'].items()}
  with pytest.raises(ValueError, match='The weights look transposed') as err:
    parse_state_dict(sd, layout=case['layout'])
  assert 'as torch.nn.Linear.' in str(err.value)


def test_square_matrices_without_bias_cannot_be_told():
  """Documented limit: square weights and no bias load either way."""
  rng = np.random.default_rng(0)
  sd = {
    k: rng.normal(size=(4, 4)).astype(np.float32)
    for k in ('wi.weight', 'wo.weight')
  }
  assert parse_state_dict(sd, layout='t5').hidden_features == 4


def test_wrong_bias_shape():
  sd = dict(REFERENCE['bert']['sd'])
  sd['intermediate.dense.bias'] = np.zeros(8, np.float32)
  with pytest.raises(
    ValueError,
    match=r"'intermediate\.dense\.bias'\] has shape \(8,\); expected \(12,\)",
  ):
    parse_state_dict(sd, layout='bert')


def test_weight_must_be_a_matrix():
  sd = llama_sd()
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
  sd = llama_sd()
  sd['down_proj.weight'] = np.zeros((4, 6), np.int32)
  with pytest.raises(ValueError, match=r"'down_proj\.weight'.*floating point"):
    parse_state_dict(sd, layout='llama')


def test_unknown_activation_raises_value_error():
  with pytest.raises(ValueError, match='unknown activation'):
    parse_state_dict(llama_sd(), layout='llama', activation='gelu_fancy')


def test_state_dict_must_be_a_mapping():
  with pytest.raises(TypeError, match='state_dict must be a mapping'):
    parse_state_dict(list(llama_sd().items()), layout='llama')  # type: ignore[arg-type]


# --- activations the builders reject ------------------------------------------

FRAMEWORKS = {
  'linen': lambda sd, **kw: fl.from_torch(sd, **kw)[0],
  'nnx': fx.from_torch,
}


class GELUTanh:
  """Stands in for Hugging Face's torch module: it rejects JAX arrays."""

  def __call__(self, x):
    raise TypeError('linear(): argument must be Tensor, not DynamicJaxprTracer')


GELUTanh.__module__ = 'transformers.activations'


class GELU:
  """Stands in for ``torch.nn.GELU(approximate='tanh')``."""

  approximate = 'tanh'

  def __call__(self, x):
    raise TypeError('gelu(): argument must be Tensor')


@pytest.mark.parametrize('framework', sorted(FRAMEWORKS))
def test_torch_activation_modules_are_rejected_with_the_name(framework):
  build = FRAMEWORKS[framework]
  sd = REFERENCE['gemma']['sd']
  with pytest.raises(
    TypeError,
    match=r'transformers\.activations\.GELUTanh, which does not run on JAX'
    r".*Pass activation='gelu_pytorch_tanh' instead",
  ):
    build(sd, layout='gemma', activation=GELUTanh())
  with pytest.raises(TypeError, match="activation='gelu_pytorch_tanh'"):
    build(sd, layout='gemma', activation=GELU())
  with pytest.raises(TypeError, match='its registry name'):
    build(sd, layout='gemma', activation=lambda x: np.asarray(x) * 2)
  with pytest.raises(TypeError, match='not callable'):
    build(sd, layout='gemma', activation=3)


def test_jax_functions_are_accepted():
  sd = REFERENCE['gemma']['sd']
  layer = fx.from_torch(sd, layout='gemma', activation=lambda x: jnp.tanh(x))
  assert layer(jnp.ones((2, 8))).shape == (2, 8)


def test_learnable_activation_modules_are_rejected():
  sd = REFERENCE['llama']['sd']
  with pytest.raises(TypeError, match='PReLU module has parameters'):
    fl.from_torch(sd, layout='llama', activation=fl.PReLU())
  with pytest.raises(TypeError, match='XIELU module has parameters'):
    fx.from_torch(sd, layout='llama', activation=fx.XIELU())


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


def test_fake_tensor_error_dtype():
  sd = {k: FakeTensor(v, dtype='torch.bfloat16') for k, v in llama_sd().items()}
  sd['up_proj.weight'].dtype = 'torch.qint8'
  with pytest.raises(ValueError, match=r"'up_proj\.weight'.*'qint8'"):
    parse_state_dict(sd, layout='llama')
