"""The name registry: look-up rules, aliases, parameters and errors."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import flaxact
from flaxact._src.activations.registry import GATED_NAMES
from tests.helpers import CASES, GATED_CASES


def test_every_registered_function_has_a_test_case():
  """Adding a name to the registry without a test case fails here."""
  tested = {id(c.fn) for c in CASES.values()}
  tested |= {id(fn) for fn, _ in GATED_CASES.values()}
  untested = [n for n, f in flaxact.ACTIVATIONS.items() if id(f) not in tested]
  assert not untested
  assert set(GATED_CASES) == GATED_NAMES


def test_registered_names_resolve_to_the_public_functions():
  for name in CASES:
    assert flaxact.get_activation(name) is getattr(flaxact, name)
  for name in GATED_CASES:
    assert flaxact.get_activation(name) is getattr(flaxact, name)


@pytest.mark.parametrize(
  'name,expected',
  [
    ('gelu', 'gelu'),
    ('gelu_python', 'gelu'),
    ('gelu_new', 'gelu_tanh'),
    ('gelu_pytorch_tanh', 'gelu_tanh'),
    ('gelu_fast', 'gelu_tanh'),
    ('gelu_accurate', 'gelu_tanh'),
    ('quick_gelu', 'quick_gelu'),
    ('relu2', 'relu_squared'),
    ('silu', 'silu'),
    ('swish', 'swish'),
    ('linear', 'identity'),
    ('hardswish', 'hard_silu'),
    ('hardsigmoid', 'hard_sigmoid'),
    ('mish', 'mish'),
    ('relu6', 'relu6'),
    ('leaky_relu', 'leaky_relu'),
  ],
)
def test_hugging_face_and_pytorch_names(name, expected):
  assert flaxact.get_activation(name) is getattr(flaxact, expected)


def test_hugging_face_gelu_is_exact_and_gelu_new_is_tanh():
  x = jnp.array([0.5, 1.0, 2.0])
  exact = CASES['gelu'].ref(np.asarray(x, np.float64))
  np.testing.assert_allclose(
    flaxact.get_activation('gelu')(x), exact, rtol=1e-6
  )
  tanh = CASES['gelu_tanh'].ref(np.asarray(x, np.float64))
  np.testing.assert_allclose(
    flaxact.get_activation('gelu_new')(x), tanh, rtol=1e-6
  )
  silu = flaxact.get_activation('swish')(x)
  np.testing.assert_array_equal(silu, flaxact.silu(x))


@pytest.mark.parametrize(
  'spelling,expected',
  [
    ('GELU', 'gelu'),
    ('Gelu-New', 'gelu_tanh'),
    (' swiglu ', 'swiglu'),
    ('LEAKY-RELU', 'leaky_relu'),
    ('hard-silu', 'hard_silu'),
  ],
)
def test_case_and_dash_insensitive(spelling, expected):
  assert flaxact.get_activation(spelling) is getattr(flaxact, expected)


def test_unknown_name_lists_valid_names_and_closest_match():
  with pytest.raises(ValueError) as info:
    flaxact.get_activation('sigmoidd')
  message = str(info.value)
  assert "'sigmoidd'" in message
  assert "Did you mean 'sigmoid'?" in message
  for name in flaxact.ACTIVATIONS:
    assert name in message


def test_non_string_non_callable_is_a_type_error():
  with pytest.raises(TypeError, match='registered name or a callable'):
    flaxact.get_activation(3)


def test_parameters_bind_through_the_registry():
  x = jnp.array([-2.0, 2.0])
  act = flaxact.get_activation('leaky_relu', negative_slope=0.5)
  assert isinstance(act, functools.partial)
  np.testing.assert_array_equal(act(x), [-1.0, 2.0])
  np.testing.assert_array_equal(
    flaxact.get_activation('elu', alpha=2.0)(x), flaxact.elu(x, 2.0)
  )
  np.testing.assert_array_equal(
    flaxact.get_activation('swish', beta=1.702)(x), flaxact.quick_gelu(x)
  )
  np.testing.assert_array_equal(
    flaxact.get_activation('swiglu', axis=0)(jnp.ones((4, 3))).shape, (2, 3)
  )


def test_unknown_parameter_is_a_type_error_naming_the_accepted_ones():
  with pytest.raises(TypeError, match=r"\['negative_slope'\].*\['slope'\]"):
    flaxact.get_activation('leaky_relu', slope=0.2)
  with pytest.raises(TypeError, match='none'):
    flaxact.get_activation('relu', alpha=1.0)


def test_callables_pass_through():
  assert flaxact.get_activation(jnp.tanh) is jnp.tanh
  bound = flaxact.get_activation(flaxact.celu, alpha=3.0)
  np.testing.assert_array_equal(
    bound(jnp.array([-1.0])), flaxact.celu(jnp.array([-1.0]), 3.0)
  )


def test_activations_mapping_is_read_only():
  with pytest.raises(TypeError, match='does not support item assignment'):
    flaxact.ACTIVATIONS['mine'] = flaxact.relu  # type: ignore[index]
