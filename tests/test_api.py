"""The public API: exported names and their documentation."""

import inspect

import pytest

import flaxact

EXPECTED_TOP_LEVEL = {
  # element-wise (CONTRACT.md)
  'relu',
  'relu6',
  'leaky_relu',
  'elu',
  'selu',
  'celu',
  'gelu',
  'gelu_tanh',
  'quick_gelu',
  'silu',
  'swish',
  'sigmoid',
  'hard_sigmoid',
  'hard_silu',
  'tanh',
  'softplus',
  'mish',
  'relu_squared',
  'identity',
  # split-form gated
  'glu',
  'reglu',
  'geglu',
  'geglu_tanh',
  'swiglu',
  'bilinear',
  # two-array gated product, registry, hidden width
  'gated_product',
  'get_activation',
  'ACTIVATIONS',
  'ffn_hidden_features',
}


def test_top_level_exports_exactly_the_contract():
  assert set(flaxact.__all__) == EXPECTED_TOP_LEVEL
  for name in EXPECTED_TOP_LEVEL:
    assert hasattr(flaxact, name), name


def test_version_comes_from_package_metadata():
  from importlib import metadata

  assert flaxact.__version__ == metadata.version('flaxact')


def _public_callables():
  for name in sorted(flaxact.__all__):
    obj = getattr(flaxact, name)
    if callable(obj):
      yield name, obj


@pytest.mark.parametrize('name,obj', list(_public_callables()))
def test_every_public_callable_is_documented(name, obj):
  doc = inspect.getdoc(obj) or ''
  assert doc.strip(), name
  assert 'Args:' in doc, name
  assert 'Examples:' in doc and '>>>' in doc, name
  assert 'Returns:' in doc, name


@pytest.mark.parametrize('name', sorted(flaxact.__all__))
def test_optional_arguments_follow_jax_nn_names(name):
  """Where jax.nn has the function, our parameter names match its names."""
  import jax

  ours = getattr(flaxact, name)
  theirs = getattr(jax.nn, name, None)
  if theirs is None or not callable(ours):
    return
  ours_params = list(inspect.signature(ours).parameters)
  theirs_params = list(inspect.signature(theirs).parameters)
  # One list extends the other: jax.nn.swish has no beta, ours does.
  n = min(len(ours_params), len(theirs_params))
  assert ours_params[:n] == theirs_params[:n], name
