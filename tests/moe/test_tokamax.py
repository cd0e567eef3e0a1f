"""``impl='tokamax'``: the grouped matmul through ``tokamax.ragged_dot``.

tokamax is optional. Without it, ``impl='tokamax'`` is an ``ImportError``
that names ``pip install tokamax`` (made a condition here by blocking the
import) and ``'auto'`` never picks it; with it (the ``test`` extra), the
impl equals every other impl, forward and gradients, on CPU through
tokamax's XLA path, and lowers for TPU and GPU.
"""

from __future__ import annotations

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from flaxact._src.moe.experts import api

T, D, H, E, K = 16, 8, 12, 8, 2
IMPLS = ('loop', 'tiles', 'ragged', 'dense')
# f32 sums of D*H products in another order (tokamax's XLA path)
F32_FFN = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _weights():
  ks = jax.random.split(jax.random.key(3), 5)
  n = lambda i, s, scale: jax.random.normal(ks[i], s) * scale
  return (
    n(0, (T, D), 1.0),
    n(1, (D, E), 1.0),
    n(2, (E, D, H), D**-0.5),
    n(3, (E, D, H), D**-0.5),
    n(4, (E, H, D), H**-0.5),
  )


def _loss(impl):
  def loss(*w):
    y, _ = flaxact.moe_ffn(*w, experts_per_token=K, impl=impl)
    return jnp.sum(y**2), y

  return loss


# ------------------------------------------------------ without tokamax


@pytest.fixture
def no_tokamax(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tokamax', None)  # import fails


def test_missing_tokamax_is_an_import_error_naming_pip(no_tokamax):
  with pytest.raises(ImportError, match='pip install tokamax'):
    flaxact.moe_ffn(*_weights(), experts_per_token=K, impl='tokamax')
  with pytest.raises(ImportError, match='pip install tokamax'):
    fx.MoE(D, H, E, K, impl='tokamax', rngs=nnx.Rngs(0))
  x = jnp.ones((2, D))
  with pytest.raises(ImportError, match='pip install tokamax'):
    fl.MoE(H, E, K, impl='tokamax').init(jax.random.key(0), x)


@pytest.mark.parametrize(
  'backend, installed, want',
  [
    ('cpu', True, 'loop'),
    ('gpu', True, 'tokamax'),
    ('tpu', True, 'tokamax'),
    ('gpu', False, 'ragged'),
    ('tpu', False, 'ragged'),
  ],
)
def test_auto_picks_tokamax_on_accelerators_when_installed(
  monkeypatch, backend, installed, want
):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(api, 'tokamax_available', lambda: installed)
  assert api.resolve_impl('auto') == want
  assert api.resolve_impl('auto', quantized=True) == want
  assert api.resolve_impl('auto', hooked=True) == 'dense'


def test_auto_without_tokamax_on_gpu(monkeypatch, no_tokamax):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not api.tokamax_available()
  assert api.resolve_impl('auto') == 'ragged'


# --------------------------------------------------------- with tokamax


@pytest.fixture
def tokamax():
  """tokamax, its absl flags marked parsed for the test.

  tokamax 0.0.12 reads its config from absl flags and, on first use, parses
  ``sys.argv`` (pytest's own flags here, which absl rejects) unless the
  flags are already parsed.
  """
  module = pytest.importorskip('tokamax')
  from absl import flags

  parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  yield module
  if not parsed:
    flags.FLAGS.unparse_flags()


def test_tokamax_equals_every_impl_forward_and_gradients(tokamax):
  w = _weights()
  grad = lambda impl: jax.jit(
    jax.value_and_grad(_loss(impl), argnums=(0, 1, 2, 3, 4), has_aux=True)
  )(*w)
  want = grad('tokamax')
  for impl in IMPLS:
    chex.assert_trees_all_close(grad(impl), want, **F32_FFN)


def test_tokamax_layers_and_vmap(tokamax):
  x = jax.random.normal(jax.random.key(0), (3, 5, D))
  layer = fx.MoE(D, H, E, K, impl='tokamax', rngs=nnx.Rngs(0))
  call = nnx.jit(lambda m, x: m(x))  # jitted: eager dispatch is slow
  y = call(layer, x)
  layer.impl = 'loop'
  chex.assert_trees_all_close(call(layer, x), y, **F32_FFN)
  linen = fl.MoE(H, E, K, impl='tokamax')
  v = linen.init(jax.random.key(0), x)
  y = jax.jit(linen.apply)(v, x)
  chex.assert_trees_all_close(
    jax.jit(fl.MoE(H, E, K, impl='ragged').apply)(v, x), y, **F32_FFN
  )
  # under vmap the ragged impls run as 'tiles' (no batching rule)
  per_example = jax.jit(jax.vmap(lambda x: linen.apply(v, x)))(x)
  chex.assert_trees_all_close(per_example, y, **F32_FFN)


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_tokamax_lowers_for_accelerators(tokamax, platform):
  w = _weights()
  for f in (_loss('tokamax'), jax.grad(_loss('tokamax'), has_aux=True)):
    text = jax.jit(f).trace(*w).lower(lowering_platforms=(platform,)).as_text()
    assert 'func.func public @main' in text
    assert not np.any(['callback' in line for line in text.splitlines()])
