"""The routed FFN ``flaxact.moe_ffn``: references, impls, grads, memory."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxact
from flaxact._src.moe import dispatch
from tests import moe_reference as ref
from tests.layer_helpers import residuals_of_shape
from tests.moe.test_routing import ROUTER_CASES, jax_kwargs, ref_kwargs

T, D, H, E = 16, 8, 12, 8
IMPLS = ('loop', 'tiles', 'ragged', 'dense')
GROUPED = IMPLS[:3]
# f32 sums of D*H products against a float64 reference
F32_FFN = dict(rtol=2e-5, atol=2e-5)


def _weights(dtype=jnp.float32, bias=False):
  ks = jax.random.split(jax.random.key(3), 9)
  n = lambda i, s, scale: (jax.random.normal(ks[i], s) * scale).astype(dtype)
  w = dict(
    x=n(0, (T, D), 1.0),
    router_kernel=n(1, (D, E), 1.0),
    gate_kernel=n(2, (E, D, H), D**-0.5),
    up_kernel=n(3, (E, D, H), D**-0.5),
    down_kernel=n(4, (E, H, D), H**-0.5),
  )
  if bias:
    w.update(
      router_bias=n(5, (E,), 0.5),
      gate_bias=n(6, (E, H), 0.5),
      up_bias=n(7, (E, H), 0.5),
      down_bias=n(8, (E, D), 0.5),
    )
  return w


def _np(w, key):
  return None if key not in w else np.asarray(w[key], np.float64)


def _call(w, k, **kw):
  w = dict(w)
  x = w.pop('x')
  names = ('router_kernel', 'gate_kernel', 'up_kernel', 'down_kernel')
  return flaxact.moe_ffn(
    x, *(w.pop(n) for n in names), experts_per_token=k, tile_size=4, **w, **kw
  )


def _jit_call(w, k, **kw):
  """``_call`` compiled (one dispatch instead of hundreds of small ops)."""
  return jax.jit(lambda w: _call(w, k, **kw))(w)


@pytest.mark.parametrize('capacity', [None, 0.6])
@pytest.mark.parametrize('name', sorted(ROUTER_CASES))
def test_matches_float64_reference(name, capacity):
  k, kw = ROUTER_CASES[name]
  bias = jax.random.normal(jax.random.key(1), (E,)) * 0.3
  w = _weights()
  expected, experts, dropped = ref.moe(
    *(
      _np(w, n)
      for n in ('x', 'router_kernel', 'gate_kernel', 'up_kernel', 'down_kernel')
    ),
    k,
    capacity_factor=capacity,
    **ref_kwargs(kw, bias),
  )
  # Each case runs one impl (rotating); test_impls_agree covers the rest.
  i = sorted(ROUTER_CASES).index(name) + 2 * (capacity is None)
  impl = IMPLS[i % len(IMPLS)]
  with jax.default_matmul_precision('highest'):
    y, aux = _jit_call(
      w, k, impl=impl, capacity_factor=capacity, **jax_kwargs(kw, bias)
    )
    np.testing.assert_allclose(np.asarray(y), expected, **F32_FFN)
    np.testing.assert_array_equal(np.asarray(aux.experts), experts)
    np.testing.assert_array_equal(np.asarray(aux.dropped), dropped)
    assert int(aux.dropped_tokens) == dropped.sum()
    assert (capacity is None) == (dropped.sum() == 0)
    np.testing.assert_array_equal(
      np.asarray(aux.expert_load), np.bincount(experts.ravel(), minlength=E)
    )


def test_gpt_oss_biases_and_clamped_product():
  w = _weights(bias=True)
  product = functools.partial(flaxact.gpt_oss_glu, alpha=1.702, limit=0.5)
  expected, _, _ = ref.moe(
    *(
      _np(w, n)
      for n in ('x', 'router_kernel', 'gate_kernel', 'up_kernel', 'down_kernel')
    ),
    2,
    router_bias=_np(w, 'router_bias'),
    biases=tuple(_np(w, n) for n in ('gate_bias', 'up_bias', 'down_bias')),
    product=lambda g, u: ref.gpt_oss_glu(g, u, 1.702, 0.5),
  )
  with jax.default_matmul_precision('highest'):
    for impl in IMPLS:
      y, _ = _jit_call(w, 2, impl=impl, gated_product=product)
      np.testing.assert_allclose(np.asarray(y), expected, **F32_FFN)


@pytest.mark.parametrize('impl', IMPLS)
def test_gradients_reach_router_and_experts(impl):
  w = _weights(bias=True)
  names = list(w)

  @jax.jit
  def f(*args):
    return _call(
      dict(zip(names, args, strict=True)), 2, impl=impl, capacity_factor=1.0
    )[0]

  with jax.default_matmul_precision('highest'):
    check_grads(
      f, tuple(w.values()), order=1, modes=['rev'], atol=3e-3, rtol=3e-3
    )  # f32 finite differences through 4 matmuls
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=1)(*w.values())
  assert float(jnp.abs(grads).sum()) > 0  # the router kernel


def test_impls_agree_under_jit_and_vmap():
  w = _weights()
  x = w['x']
  with jax.default_matmul_precision('highest'):
    outs = [_jit_call(w, 3, impl=i)[0] for i in IMPLS]
    for o in outs[1:]:
      np.testing.assert_allclose(
        np.asarray(o), np.asarray(outs[0]), rtol=1e-5, atol=1e-5
      )
    fn = jax.jit(lambda x: _call({**w, 'x': x}, 3, impl='loop')[0])
    np.testing.assert_allclose(
      np.asarray(fn(x)), np.asarray(outs[0]), rtol=1e-5, atol=1e-5
    )
    batch = jnp.stack([x, x[::-1]])
    vm = jax.vmap(fn)(batch)
    np.testing.assert_allclose(
      np.asarray(vm[1]), np.asarray(fn(x[::-1])), rtol=1e-5, atol=1e-5
    )
    y3, _ = _jit_call({**w, 'x': batch}, 3, impl='loop')  # leading dims kept
    assert y3.shape == (2, T, D)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_dtype_preserved_router_in_f32(dtype):
  w = _weights(dtype)
  y, aux = _jit_call(w, 2, impl='loop')
  y32, _ = _jit_call(_weights(), 2, impl='loop')
  assert y.dtype == dtype and aux.router_logits.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(y, np.float32), np.asarray(y32), rtol=0.1, atol=0.1
  )  # rounded weights and x


@pytest.mark.parametrize('impl', GROUPED)
def test_backward_keeps_two_hidden_sized_arrays(impl):
  w = _weights()
  rows = dispatch.num_rows(T * 2, E, 1 if impl == 'ragged' else 4, None)

  def loss(x, gk, uk, dk):
    return _call(
      {**w, 'x': x, 'gate_kernel': gk, 'up_kernel': uk, 'down_kernel': dk},
      2,
      impl=impl,
    )[0].sum()

  args = (w['x'], w['gate_kernel'], w['up_kernel'], w['down_kernel'])
  hidden = residuals_of_shape(loss, args, (rows, H))
  assert len(hidden) == 2, hidden
  remat = jax.checkpoint(loss, policy=dispatch.MOE_REMAT_POLICY)
  hidden = residuals_of_shape(remat, args, (rows, H))
  assert len(hidden) == 2 and "named 'moe_gate'" in ' '.join(hidden), hidden


def test_dense_backward_keeps_two_pre_activations_under_remat():
  w = _weights()

  def loss(x, gk, uk, dk):
    return _call(
      {**w, 'x': x, 'gate_kernel': gk, 'up_kernel': uk, 'down_kernel': dk},
      2,
      impl='dense',
    )[0].sum()

  args = (w['x'], w['gate_kernel'], w['up_kernel'], w['down_kernel'])
  remat = jax.checkpoint(loss, policy=dispatch.MOE_REMAT_POLICY)
  hidden = residuals_of_shape(remat, args, (E, T, H))
  assert len(hidden) == 2 and "named 'moe_gate'" in ' '.join(hidden), hidden


@pytest.mark.parametrize('capacity_factor', [0.5, 1.25])
def test_dense_with_capacity_uses_the_slots_only(capacity_factor):
  """C < T: each expert computes its C slots, not every token."""
  w = _weights(bias=True)
  c = math.ceil(capacity_factor * T * 2 / E)
  assert c < T

  def loss(x, gk, uk, dk, impl='dense'):
    new = {'x': x, 'gate_kernel': gk, 'up_kernel': uk, 'down_kernel': dk}
    y, aux = _call({**w, **new}, 2, impl=impl, capacity_factor=capacity_factor)
    return jnp.sum(jnp.sin(y)), aux.dropped

  args = (w['x'], w['gate_kernel'], w['up_kernel'], w['down_kernel'])
  remat = jax.checkpoint(
    lambda *a: loss(*a)[0], policy=dispatch.MOE_REMAT_POLICY
  )
  assert len(residuals_of_shape(remat, args, (E, c, H))) == 2
  assert not residuals_of_shape(remat, args, (E, T, H))
  with jax.default_matmul_precision('highest'):
    (got, dropped), g = jax.jit(
      jax.value_and_grad(loss, (0, 1, 3), has_aux=True)
    )(*args)
    (want, want_dropped), g_want = jax.jit(
      jax.value_and_grad(
        functools.partial(loss, impl='loop'), (0, 1, 3), has_aux=True
      )
    )(*args)
  if capacity_factor < 1:
    assert int(dropped.sum()) > 0  # the capacity bites
  np.testing.assert_array_equal(np.asarray(dropped), np.asarray(want_dropped))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(g, g_want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F32_FFN)


def _recording_dot(calls):
  def dot(lhs, rhs, dims, precision=None, preferred_element_type=None):
    calls.append(tuple(rhs.shape))
    return jax.lax.dot_general(
      lhs, rhs, dims, precision, preferred_element_type=preferred_element_type
    )

  return dot


def test_dot_general_hook_reaches_router_and_every_expert_projection():
  w, calls = _weights(bias=True), []
  with jax.default_matmul_precision('highest'):
    y, _ = _call(w, 2, dot_general=_recording_dot(calls))  # 'auto'
    want, _ = _jit_call(w, 2, impl='loop')
  assert calls == [(D, E), (E, D, H), (E, D, H), (E, H, D)]
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), **F32_FFN)
  with pytest.raises(ValueError, match=r"impl='loop'.*dot_general"):
    _call(w, 2, impl='loop', dot_general=_recording_dot([]))


def test_auto_runs_dense_while_dot_general_is_intercepted(monkeypatch):
  """A library patching ``jax.lax.dot_general`` (as Qwix does) sees experts."""
  w, calls = _weights(), []
  original = jax.lax.dot_general
  with jax.default_matmul_precision('highest'):
    want, _ = _jit_call(w, 2)  # the grouped 'loop'

    def patched(lhs, rhs, dims, precision=None, preferred_element_type=None):
      calls.append(tuple(rhs.shape))
      return original(lhs, rhs, dims, precision, preferred_element_type)

    monkeypatch.setattr(jax.lax, 'dot_general', patched)
    y, _ = _call(w, 2)
  assert calls.count((E, D, H)) == 2 and calls.count((E, H, D)) == 1, calls
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), **F32_FFN)


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_every_impl_lowers_for_accelerators(platform):
  w = _weights()
  for impl in IMPLS:

    def loss(x, impl=impl):
      return _call({**w, 'x': x}, 2, impl=impl)[0].sum()

    for f in (loss, jax.grad(loss)):
      jax.jit(f).trace(w['x']).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize(
  'kw, exc, words',
  [
    (dict(capacity_factor=0.0), ValueError, 'got 0.0'),
    (dict(impl='fast'), ValueError, 'unknown impl'),
    (dict(experts_per_token=9), ValueError, 'got 9'),
    (
      dict(router='sigmoid', num_groups=3, groups_per_token=1),
      ValueError,
      'divide',
    ),
    (dict(x=jnp.ones((T, D), jnp.int32)), TypeError, 'int32'),
    (dict(x=jnp.ones((T, D + 1))), ValueError, 'width 9'),
  ],
  ids=['capacity', 'impl', 'k', 'groups', 'int_x', 'width'],
)
def test_errors(kw, exc, words):
  w = _weights()
  k = kw.pop('experts_per_token', 2)
  w.update({n: kw.pop(n) for n in list(kw) if n in w})
  with pytest.raises(exc) as info:
    _call(w, k, **kw)
  assert words in str(info.value)
