"""Properties of the Linen and NNX ``MoE`` layers over generated configurations.

The configurations add a shared expert (with or without Qwen2-MoE's gate) to
the routed options of ``tests/properties/moe_configs.py``; the NNX layer is
built with random weights and its weights are handed to the Linen layer and
to the float64 reference (``tests/moe_layer_helpers.reference_of``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from hypothesis import given, note
from hypothesis import strategies as st

from flaxact import linen as fl
from flaxact import nnx as fx
from tests import moe_layer_helpers as mh
from tests.helpers import TOL
from tests.properties import moe_configs as mc
from tests.properties import profiles
from tests.properties.moe_configs import IMPLS, configs

_INIT = dict(
  kernel_init='jax.nn.initializers.normal(0.5)',
  bias_init='jax.nn.initializers.normal(0.3)',
)


def _note(c, impl):
  note(mc.moe_call(c, impl=repr(impl), tile_size='4', **_INIT))


def _nnx_layer(c, impl) -> fx.MoE:
  layer = fx.MoE(
    c['d'],
    c['h'],
    c['e'],
    c['k'],
    **mc.layer_kwargs(c),
    impl=impl,
    tile_size=4,
    kernel_init=jax.nn.initializers.normal(0.5),
    bias_init=jax.nn.initializers.normal(0.3),
    rngs=nnx.Rngs(c['seed']),
  )
  if layer.score_correction_bias is not None:
    bias = mc.weights(c)['score_correction_bias']
    layer.score_correction_bias[...] = bias
  return layer


def _linen_layer(c, impl) -> fl.MoE:
  return fl.MoE(
    c['h'], c['e'], c['k'], **mc.layer_kwargs(c), impl=impl, tile_size=4
  )


def _nnx_capture(layer, x):
  y, aux = nnx.capture(layer, nnx.Intermediate)(x)
  return y, nnx.to_pure_dict(aux)


_nnx_apply = nnx.jit(_nnx_capture)


def _linen_capture(layer, variables, x):
  y, state = layer.apply(variables, x, mutable=['intermediates'])
  return y, state['intermediates']


_linen_apply = jax.jit(_linen_capture, static_argnums=0)


def _x(c):
  return mc.weights(c)['x'].astype(c['dtype'])


def _rounded(variables, dtype):
  """The weights as the layer computes with them: all but the router's in
  ``dtype``."""
  params = {
    name: tree
    if name == 'router'
    else jax.tree.map(lambda a: a.astype(dtype), tree)
    for name, tree in variables['params'].items()
  }
  return dict(variables, params=params)


layer_configs = configs(dtypes=mc.DTYPES, shared=True)


@profiles.ci_examples(3)
@given(layer_configs, st.sampled_from(IMPLS))
def test_layer_matches_the_reference_and_linen_equals_nnx(c, impl):
  _note(c, impl)
  layer = _nnx_layer(c, impl)
  variables = mh.variables_of(layer)
  x = _x(c)
  with jax.default_matmul_precision('highest'):
    y, recorded = _nnx_apply(layer, x)
    y_linen, recorded_linen = _linen_apply(_linen_layer(c, impl), variables, x)
  kw = dict(mc.layer_kwargs(c), experts_per_token=c['k'])
  rounded = _rounded(variables, c['dtype'])
  want = mh.reference_of(kw, rounded, mc.as_f64(x).reshape(c['t'], c['d']))
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(
    mc.as_f64(y).reshape(want.shape), want, **mc.ref_tol(c['dtype'], want)
  )
  (load,) = recorded['expert_load']
  assert int(load.sum()) == c['t'] * c['k']
  # Linen given the NNX weights: exactly the same output and records
  np.testing.assert_array_equal(y_linen, y)
  assert sorted(recorded_linen) == sorted(recorded)
  for name, value in recorded.items():
    np.testing.assert_array_equal(recorded_linen[name], value, err_msg=name)


@profiles.ci_examples(2)
@given(layer_configs, st.sampled_from(IMPLS))
def test_layer_jit_equals_eager(c, impl):
  _note(c, impl)
  layer = _nnx_layer(c, impl)
  linen = _linen_layer(c, impl)
  variables = mh.variables_of(layer)
  x = _x(c)
  tol = TOL[np.dtype(c['dtype'])]
  with jax.default_matmul_precision('highest'):
    pairs = {
      'nnx': (_nnx_apply(layer, x), _nnx_capture(layer, x)),
      'linen': (
        _linen_apply(linen, variables, x),
        _linen_capture(linen, variables, x),
      ),
    }
  for name, ((y, rec), (y_eager, rec_eager)) in pairs.items():
    np.testing.assert_allclose(
      mc.as_f64(y_eager), mc.as_f64(y), **tol, err_msg=name
    )
    np.testing.assert_array_equal(
      rec_eager['expert_load'], rec['expert_load'], err_msg=name
    )
