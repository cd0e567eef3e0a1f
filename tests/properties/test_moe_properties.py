"""Properties of the routed FFN over generated configurations.

Each example draws a configuration (``tests/properties/moe_configs.py``)
and checks several properties at once. A failure prints the configuration
as a ready-to-paste ``MoE(...)`` call (``note``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

from tests.helpers import TOL
from tests.properties import moe_configs as mc
from tests.properties import profiles
from tests.properties.moe_configs import IMPLS, configs


@profiles.ci_examples(8)
@given(configs(dtypes=mc.DTYPES))
def test_every_impl_matches_the_float64_reference(c):
  note(mc.moe_call(c))
  w = mc.weights(c)
  x = w['x']
  want, dropped = mc.reference(c, w)
  tol = mc.ref_tol(c['dtype'], want)
  with jax.default_matmul_precision('highest'):
    for impl in IMPLS:
      y, aux = mc.ffn_call(c, w, impl=impl)
      assert y.shape == x.shape and y.dtype == x.dtype
      np.testing.assert_allclose(
        mc.as_f64(y).reshape(want.shape), want, **tol, err_msg=impl
      )
      np.testing.assert_array_equal(
        np.asarray(aux.dropped).reshape(dropped.shape), dropped
      )
      assert int(aux.expert_load.sum()) == c['t'] * c['k']
      assert np.isfinite([aux.load_balancing_loss, aux.router_z_loss]).all()
    # more capacity never drops more
    more = None if c['capacity'] is None else 2 * c['capacity']
    _, aux_more = mc.ffn_call(c, w, capacity=more)
    assert int(aux_more.dropped_tokens) <= int(aux.dropped_tokens)


@profiles.ci_examples(10)
@given(configs(), st.data())
def test_dropless_rows_are_independent(c, data):
  c = dict(c, capacity=None, lead=())
  note(mc.moe_call(c))
  w = mc.weights(c)
  impl = data.draw(st.sampled_from(IMPLS))
  with jax.default_matmul_precision('highest'):
    y, _ = mc.ffn_call(c, w, impl=impl)
    if c['t'] == 0:
      return
    perm = np.asarray(data.draw(st.permutations(range(c['t']))))
    yp, _ = mc.ffn_call(c, dict(w, x=w['x'][perm]), impl=impl)
    np.testing.assert_allclose(yp, y[perm], **mc.F32_FFN)
    row = data.draw(st.integers(0, c['t'] - 1))
    nan = w['x'].at[row, 0].set(jnp.nan)
    yn, _ = mc.ffn_call(c, dict(w, x=nan), impl=impl)
    others = np.arange(c['t']) != row
    np.testing.assert_allclose(yn[others], y[others], **mc.F32_FFN)


@profiles.ci_examples(3)
@given(configs(dtypes=mc.DTYPES), st.sampled_from(IMPLS))
def test_jit_equals_eager(c, impl):
  note(mc.moe_call(c, impl=repr(impl)))
  w = mc.weights(c)
  with jax.default_matmul_precision('highest'):
    (y, aux), (ye, auxe) = (
      mc.ffn_call(c, w, impl=impl, jit=jit) for jit in (True, False)
    )
  want = mc.as_f64(y)
  # half precision: jit may keep fused intermediates in float32 where eager
  # rounds each one to the dtype: the error model of ref_tol
  tol = (
    mc.ref_tol(c['dtype'], want)
    if c['dtype'] != 'float32'
    else TOL[np.dtype(np.float32)]
  )
  np.testing.assert_allclose(mc.as_f64(ye), want, **tol)
  np.testing.assert_array_equal(auxe.experts, aux.experts)
  np.testing.assert_array_equal(auxe.dropped, aux.dropped)


@profiles.ci_examples(4)
@given(configs(dtypes=mc.DTYPES, tokens=(1, 3, 13)), st.sampled_from(IMPLS))
def test_vmap_equals_a_loop_over_the_batch(c, impl):
  c = dict(c, lead=())
  note(mc.moe_call(c, impl=repr(impl)) + '  # batch of 2: x and -x')
  w = mc.weights(c)
  xs = jnp.stack([w['x'], -w['x']])
  f = lambda x: mc.ffn_call(c, dict(w, x=x), impl=impl, jit=False)[0]
  with jax.default_matmul_precision('highest'):
    batched = jax.jit(jax.vmap(f))(xs)
    for i in range(2):
      want = mc.as_f64(mc.ffn_call(c, dict(w, x=xs[i]), impl=impl)[0])
      # under vmap 'ragged' runs as 'tiles': another order of the same sums
      np.testing.assert_allclose(
        mc.as_f64(batched[i]), want, **mc.ref_tol(c['dtype'], want)
      )
