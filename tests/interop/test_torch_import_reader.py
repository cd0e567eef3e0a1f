"""The state-dict reader: every layout against real ``transformers`` modules,
what it reads, prefixes and extra keys, and the one layout table."""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from flaxact._src.interop.torch import layouts
from flaxact._src.interop.torch.layouts import LAYOUTS
from flaxact._src.interop.torch.state_dict import parse_state_dict
from tests import helpers
from tests.torch_helpers import (
  CASE_NAMES,
  REFERENCE,
  VERSIONS,
  in_a_model,
  kwargs,
  llama_sd,
  numpy_forward,
)

PORTING = pathlib.Path(__file__).parents[2] / 'docs' / 'porting.md'


def test_reference_file_has_every_layout_from_transformers():
  layouts = {REFERENCE[name]['layout'] for name in CASE_NAMES}
  assert layouts == set(LAYOUTS)
  assert VERSIONS['transformers_version'].startswith('5.')


@pytest.mark.parametrize('name', CASE_NAMES)
def test_parsed_weights_reproduce_torch_outputs(name):
  case = REFERENCE[name]
  ffn = parse_state_dict(case['sd'], **kwargs(case))
  y = numpy_forward(ffn, case['x'])
  np.testing.assert_allclose(y, case['y'], **helpers.tol(jnp.float32))


@pytest.mark.parametrize(
  'name, gated, sizes, use_bias',
  [
    ('llama', True, (8, 12, 8), False),
    ('llama_bias', True, (8, 12, 8), True),
    ('mistral', True, (8, 12, 8), False),
    ('gemma', True, (8, 12, 8), False),
    ('t5', False, (8, 12, 8), False),
    ('t5_gated', True, (8, 12, 8), False),
    ('gpt2', False, (8, 16, 8), True),
    ('starcoder2', False, (8, 16, 8), True),
    ('bert', False, (8, 12, 8), True),
    ('phi3', True, (8, 12, 8), False),
  ],
)
def test_parsed_description(name, gated, sizes, use_bias):
  case = REFERENCE[name]
  ffn = parse_state_dict(case['sd'], layout=case['layout'])
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


def test_gpt2_conv1d_is_read_as_stored_and_starcoder2_transposed():
  sd = REFERENCE['gpt2']['sd']
  ffn = parse_state_dict(sd, layout='gpt2')
  np.testing.assert_array_equal(ffn.kernels['up_proj'], sd['c_fc.weight'])
  sd = REFERENCE['starcoder2']['sd']
  ffn = parse_state_dict(sd, layout='starcoder2')
  np.testing.assert_array_equal(ffn.kernels['up_proj'], sd['c_fc.weight'].T)


def test_starcoder2_without_bias():
  sd = {
    k: v for k, v in REFERENCE['starcoder2']['sd'].items() if 'bias' not in k
  }
  ffn = parse_state_dict(sd, layout='starcoder2')
  assert not ffn.use_bias and ffn.hidden_features == 16


def test_layout_defaults_and_activation_override():
  expected = {
    'llama': 'silu',
    'mistral': 'silu',
    'qwen2': 'silu',
    'qwen3': 'silu',
    'gemma': 'gelu_pytorch_tanh',
    't5': 'relu',
    't5_gated': 'gelu_tanh',
    'gpt2': 'gelu_tanh',
    'starcoder2': 'gelu_pytorch_tanh',
    'bert': 'gelu',
    'phi3': 'silu',
  }
  assert {n: s.activation for n, s in LAYOUTS.items()} == expected
  for name in CASE_NAMES:
    case = REFERENCE[name]
    ffn = parse_state_dict(case['sd'], layout=case['layout'])
    assert ffn.activation == expected[case['layout']], name
  ffn = parse_state_dict(llama_sd(), layout='llama', activation='gelu_new')
  assert ffn.activation == 'gelu_new'


@pytest.mark.parametrize('alias', ['mistral', 'qwen2', 'qwen3', 'gemma'])
def test_aliases_read_the_llama_keys(alias):
  sd = REFERENCE['llama']['sd']
  ffn = parse_state_dict(sd, layout=alias)
  base = parse_state_dict(sd, layout='llama')
  assert ffn.layout == alias
  for name, kernel in base.kernels.items():
    np.testing.assert_array_equal(ffn.kernels[name], kernel)


def test_layout_name_is_normalised():
  ffn = parse_state_dict(REFERENCE['t5_gated']['sd'], layout='T5-Gated')
  assert ffn.layout == 't5_gated'


def test_bert_layernorm_keys_are_ignored_not_loaded():
  sd = REFERENCE['bert']['sd']
  assert 'output.LayerNorm.weight' in sd
  ffn = parse_state_dict(sd, layout='bert')
  assert set(ffn.params()) == {'up_proj', 'down_proj'}


def _table_rows(text: str) -> dict[str, str]:
  """``layout -> activation`` from a Markdown table row or an RST table."""
  rows = {}
  for names, act in re.findall(
    r'^\| (`[^|]+`) \|[^|]+\|[^|]+\| `(\w+)`', text, re.M
  ):
    for name in re.findall(r'`(\w+)`', names):
      rows[name] = act
  return rows


def _moe_activations() -> dict[str, str]:
  """Each MoE layout's default activation, from its routing settings."""
  from flaxact._src.interop.torch.moe_settings import SPECS

  return {
    name: spec.read['activation'].default if 'activation' in spec.read
    else 'gpt_oss_glu'
    for name, spec in SPECS.items()
  }  # fmt: skip


def test_docs_table_lists_every_layout_with_its_activation():
  """The docs' table is a copy for readers: it must match the source."""
  section = PORTING.read_text().split('## Layouts')[1]
  section = section.split('\n## ')[0]
  rows = _table_rows(section)
  expected = {n: s.activation for n, s in LAYOUTS.items()}
  assert rows == {**expected, **_moe_activations()}


def test_the_source_has_one_layout_table():
  """The module docstring of torch_layouts is the table; builders refer."""
  doc = layouts.__doc__ or ''
  for name in [*LAYOUTS, *_moe_activations()]:
    assert f'``{name}``' in doc, name
  import flaxact._src.linen.from_torch as linen_torch
  import flaxact._src.nnx.from_torch as nnx_torch

  for module in (linen_torch, nnx_torch):
    assert '=====' not in (module.from_torch.__doc__ or ''), module


# --- prefixes, extra keys ----------------------------------------------------


@pytest.mark.parametrize(
  'prefix', ['model.layers.1.mlp.', 'model.layers.1.mlp']
)
def test_prefix_selects_one_layer(prefix):
  sd = llama_sd(seed=3)
  ffn = parse_state_dict(in_a_model(sd, layer=1), layout='llama', prefix=prefix)
  np.testing.assert_array_equal(
    ffn.kernels['gate_proj'], sd['gate_proj.weight'].T
  )


def test_unexpected_keys_raise_naming_them():
  sd = {**llama_sd(), 'act_fn.alpha': np.ones(1, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'act_fn\.alpha'"):
    parse_state_dict(sd, layout='llama')


def test_unexpected_keys_under_a_prefix_raise():
  full = in_a_model(llama_sd())
  # 'model.layers.1' would also catch 'model.layers.1x'; the '.' is added.
  full['model.layers.0.mlp.extra.weight'] = np.zeros((2, 2))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.extra"):
    parse_state_dict(full, layout='llama', prefix='model.layers.0.mlp')


def test_strict_false_ignores_unexpected_keys():
  sd = {**llama_sd(), 'act_fn.alpha': np.ones(1, np.float32)}
  ffn = parse_state_dict(sd, layout='llama', strict=False)
  assert set(ffn.kernels) == {'gate_proj', 'up_proj', 'down_proj'}


def test_bias_keys_not_in_the_layout_are_unexpected():
  sd = {**REFERENCE['t5']['sd'], 'wi.bias': np.zeros(12, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key.*'wi\.bias'"):
    parse_state_dict(sd, layout='t5')
