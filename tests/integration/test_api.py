"""The public API: the exact exported names and their documentation.

The expected names are literal lists: adding or removing a public name means
editing them here, on purpose. A mismatch fails with the names missing from
``__all__`` and the names exported but not expected.
"""

import importlib
import inspect
from importlib import metadata

import jax
import pytest

import flaxact

EXPECTED = {
  'flaxact': [
    # element-wise (CONTRACT.md)
    'celu',
    'elu',
    'gelu',
    'gelu_10',
    'gelu_tanh',
    'hard_sigmoid',
    'hard_silu',
    'identity',
    'laplace',
    'leaky_relu',
    'mish',
    'quick_gelu',
    'relu',
    'relu6',
    'relu_squared',
    'selu',
    'sigmoid',
    'silu',
    'softplus',
    'sqrt_softplus',
    'swish',
    'tanh',
    'xielu',
    # split-form gated
    'bilinear',
    'geglu',
    'geglu_tanh',
    'glu',
    'reglu',
    'swiglu',
    # two-array gated products
    'gated_product',
    'gpt_oss_glu',
    # registry and hidden width
    'ACTIVATIONS',
    'ffn_hidden_features',
    'get_activation',
    # routed FFNs
    'MoEAux',
    'load_balancing_loss',
    'moe_ffn',
    'router_z_loss',
    'sequence_balance_loss',
    'top_k_routing',
    'update_score_correction_bias',
  ],
  'flaxact.linen': [
    'CHECKPOINT_NAMES',
    'EXPERT_PARALLEL_RULES',
    'FFN',
    'FSDP_RULES',
    'FSDP_TENSOR_PARALLEL_RULES',
    'GatedFFN',
    'GeGLU',
    'MoE',
    'PReLU',
    'ReGLU',
    'SwiGLU',
    'Swish',
    'TENSOR_PARALLEL_RULES',
    'XIELU',
    'from_torch',
  ],
  'flaxact.nnx': [
    'CHECKPOINT_NAMES',
    'EXPERT_PARALLEL_RULES',
    'FFN',
    'FSDP_RULES',
    'FSDP_TENSOR_PARALLEL_RULES',
    'GatedFFN',
    'GeGLU',
    'MoE',
    'PReLU',
    'ReGLU',
    'SwiGLU',
    'Swish',
    'TENSOR_PARALLEL_RULES',
    'XIELU',
    'from_torch',
  ],
}
MODULES = sorted(EXPECTED)


def _difference(found, expected) -> str:
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  return f'missing: {missing}; not expected: {extra}'


@pytest.mark.parametrize('module_name', MODULES)
def test_all_is_exactly_the_expected_names(module_name):
  module = importlib.import_module(module_name)
  exported = list(module.__all__)
  assert len(exported) == len(set(exported)), f'duplicates in {exported}'
  assert set(exported) == set(EXPECTED[module_name]), (
    f'{module_name}.__all__ differs from tests/test_api.py: '
    + _difference(exported, EXPECTED[module_name])
  )


@pytest.mark.parametrize('module_name', MODULES)
def test_every_public_attribute_is_in_all(module_name):
  """No name is importable from the module without being in ``__all__``."""
  module = importlib.import_module(module_name)
  public = {
    name
    for name, value in vars(module).items()
    if not name.startswith('_') and not inspect.ismodule(value)
  }
  assert public == set(module.__all__), _difference(public, module.__all__)


def test_linen_and_nnx_export_the_same_names():
  from flaxact import linen, nnx

  assert set(linen.__all__) == set(nnx.__all__), _difference(
    nnx.__all__, linen.__all__
  )


def test_version_comes_from_package_metadata():
  assert flaxact.__version__ == metadata.version('flaxact')


def _public_callables():
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    for name in sorted(module.__all__):
      obj = getattr(module, name)
      if callable(obj):
        yield pytest.param(obj, id=f'{module_name}.{name}')


@pytest.mark.parametrize('obj', list(_public_callables()))
def test_every_public_callable_is_documented(obj):
  doc = inspect.getdoc(obj) or ''
  assert doc.strip()
  assert 'Examples:' in doc and '>>>' in doc
  if inspect.isclass(obj):
    assert 'Args:' in doc or 'Attributes:' in doc
  else:
    assert 'Args:' in doc and 'Returns:' in doc


JAX_NN_TWINS = sorted(
  name
  for name in flaxact.__all__
  if callable(getattr(jax.nn, name, None))
  and callable(getattr(flaxact, name))
  and not inspect.isclass(getattr(flaxact, name))
)


def test_jax_nn_twins_are_found():
  """Guards the parametrisation below against an empty list."""
  assert {'relu', 'gelu', 'silu', 'glu', 'sigmoid'} <= set(JAX_NN_TWINS)


@pytest.mark.parametrize('name', JAX_NN_TWINS)
def test_parameter_names_follow_jax_nn(name):
  """Where jax.nn has the function, our parameter names extend its names."""
  ours = list(inspect.signature(getattr(flaxact, name)).parameters)
  theirs = list(inspect.signature(getattr(jax.nn, name)).parameters)
  # One list extends the other: jax.nn.swish has no beta, ours does.
  n = min(len(ours), len(theirs))
  assert ours[:n] == theirs[:n]
