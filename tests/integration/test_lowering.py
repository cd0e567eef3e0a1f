"""Every layer and function lowers for TPU and GPU, forward and backward.

Lowering (``jax.jit(f).trace(...).lower(lowering_platforms=...)``) runs
JAX's platform-specific lowering rules without the hardware, so this CPU-only
suite catches what would fail only on an accelerator: a lowering rule that
exists only for CPU, a host callback, a CPU-only custom call. Only the
public API is used.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx

PLATFORMS = ('tpu', 'cuda')
# Custom-call targets that run on the host: none may appear.
HOST_ONLY = re.compile(r'cpu|lapack|ducc|callback', re.IGNORECASE)
D, H = 8, 16  # features, hidden features


def _lower_everywhere(fn, *args) -> None:
  traced = jax.jit(fn).trace(*args)
  for platform in PLATFORMS:
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert 'func.func public @main' in text, platform
    targets = set(re.findall(r'custom_call @([\w.$-]+)', text))
    host = sorted(t for t in targets if HOST_ONLY.search(t))
    assert not host, (platform, host)


def _x(shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)


# --------------------------------------------------------------------------
# functions: every registered activation and gated function
# --------------------------------------------------------------------------
def _registered_functions():
  seen = {}
  for name, fn in flaxact.ACTIVATIONS.items():
    seen.setdefault(id(fn), (name, fn))
  return sorted(seen.values(), key=lambda item: item[0])


FUNCTIONS = _registered_functions()


def test_every_registered_function_is_lowered():
  """Guards the parametrisation below: one case per distinct function."""
  names = {name for name, _ in FUNCTIONS}
  assert {'relu', 'gelu', 'silu', 'sigmoid', 'tanh', 'swiglu', 'glu'} <= names
  assert len(FUNCTIONS) == len({id(f) for f in flaxact.ACTIVATIONS.values()})


@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16), ids=str)
@pytest.mark.parametrize(
  'fn', [f for _, f in FUNCTIONS], ids=[n for n, _ in FUNCTIONS]
)
def test_function_forward_and_backward_lower(fn, dtype):
  # (4, 2 * D): element-wise functions keep the shape, gated ones halve it.
  x = _x((4, 2 * D), dtype)

  def forward_backward(v, g):
    y, vjp = jax.vjp(fn, v)
    return y, vjp(g[..., : y.shape[-1]])[0]

  _lower_everywhere(forward_backward, x, x)


@pytest.mark.parametrize(
  'fn',
  [flaxact.gated_product, flaxact.gpt_oss_glu],
  ids=['gated_product', 'gpt_oss_glu'],
)
def test_two_array_gated_products_lower(fn):
  gate, up = _x((4, H)), _x((4, H), jnp.bfloat16).astype(jnp.float32)

  def forward_backward(a, b):
    y, vjp = jax.vjp(fn, a, b)
    return y, vjp(jnp.ones_like(y))

  _lower_everywhere(forward_backward, gate, up)


# --------------------------------------------------------------------------
# layers, Linen and NNX
# --------------------------------------------------------------------------
LINEN_LAYERS = {
  'FFN': lambda: fl.FFN(H),
  'FFN (dropout, training)': lambda: fl.FFN(H, dropout_rate=0.1),
  'GatedFFN': lambda: fl.GatedFFN(H, activation='gelu_tanh', use_bias=True),
  'GatedFFN (fused gate/up)': lambda: fl.GatedFFN(H, fused_gate_up=True),
  'SwiGLU': lambda: fl.SwiGLU(H),
  'GeGLU': lambda: fl.GeGLU(H),
  'ReGLU (dropout, training)': lambda: fl.ReGLU(H, dropout_rate=0.1),
  'PReLU': lambda: fl.PReLU(D),
  'Swish': lambda: fl.Swish(D),
  'XIELU': lambda: fl.XIELU(),
  'MoE': lambda: fl.MoE(H, 4, 2),
  'MoE (sigmoid router, shared expert, capacity)': lambda: fl.MoE(
    H,
    4,
    2,
    router='sigmoid',
    num_groups=2,
    groups_per_token=1,
    shared_hidden_features=H,
    capacity_factor=1.5,
  ),
}
NNX_LAYERS = {
  'FFN': lambda r: fx.FFN(D, H, rngs=r),
  'FFN (dropout, training)': lambda r: fx.FFN(D, H, dropout_rate=0.1, rngs=r),
  'GatedFFN': lambda r: fx.GatedFFN(
    D, H, activation='gelu_tanh', use_bias=True, rngs=r
  ),
  'GatedFFN (fused gate/up)': lambda r: fx.GatedFFN(
    D, H, fused_gate_up=True, rngs=r
  ),
  'SwiGLU': lambda r: fx.SwiGLU(D, H, rngs=r),
  'GeGLU': lambda r: fx.GeGLU(D, H, rngs=r),
  'ReGLU (dropout, training)': lambda r: fx.ReGLU(
    D, H, dropout_rate=0.1, rngs=r
  ),
  'PReLU': lambda r: fx.PReLU(D),
  'Swish': lambda r: fx.Swish(D),
  'XIELU': lambda r: fx.XIELU(),
  'MoE': lambda r: fx.MoE(D, H, 4, 2, rngs=r),
  'MoE (sigmoid router, shared expert, capacity)': lambda r: fx.MoE(
    D,
    H,
    4,
    2,
    router='sigmoid',
    num_groups=2,
    groups_per_token=1,
    shared_hidden_features=H,
    capacity_factor=1.5,
    rngs=r,
  ),
}


@pytest.mark.parametrize('module', [fl, fx], ids=['linen', 'nnx'])
def test_every_exported_layer_has_a_lowering_case(module):
  """A new layer class fails here until it gets a case above."""
  cases = LINEN_LAYERS if module is fl else NNX_LAYERS
  covered = {name.split(' ')[0] for name in cases}
  layers = {
    name for name in module.__all__ if isinstance(getattr(module, name), type)
  }
  assert layers == covered, sorted(layers ^ covered)


def _loss(y):
  return jnp.sum(jnp.square(y.astype(jnp.float32)))


@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16), ids=str)
@pytest.mark.parametrize('name', sorted(LINEN_LAYERS))
def test_linen_layer_forward_and_backward_lower(name, dtype):
  layer = LINEN_LAYERS[name]()
  x = _x((2, 3, D), dtype)
  takes_flag = 'deterministic' in inspect.signature(layer.__call__).parameters
  flag = {'deterministic': True} if takes_flag else {}
  variables = layer.init(jax.random.key(1), x, **flag)
  if 'training' in name:
    rngs = {'dropout': jax.random.key(2)}
    apply = lambda v, x: layer.apply(v, x, deterministic=False, rngs=rngs)
  else:
    apply = lambda v, x: layer.apply(v, x, **flag)

  def forward_backward(v, x):
    return jax.value_and_grad(lambda v, x: _loss(apply(v, x)), (0, 1))(v, x)

  _lower_everywhere(forward_backward, variables, x)


@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16), ids=str)
@pytest.mark.parametrize('name', sorted(NNX_LAYERS))
def test_nnx_layer_forward_and_backward_lower(name, dtype):
  layer = NNX_LAYERS[name](nnx.Rngs(0, dropout=1))
  x = _x((2, 3, D), dtype)
  # Dropout layers are in training mode (NNX's default) and carry RNG state,
  # which nnx.value_and_grad threads through; gradients are the Params'.
  graphdef, state = nnx.split(layer)

  def forward_backward(state, x):
    model = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(lambda m, x: _loss(m(x)), argnums=(0, 1))
    return grad_fn(model, x)

  _lower_everywhere(forward_backward, state, x)
