"""Routers, auxiliary losses, the DeepSeek bias update and gpt_oss_glu."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxact
from tests import moe_reference as ref
from tests.helpers import GRAD_TOL, tol

T, E = 12, 8
ROUTER_CASES = {
  'softmax_renorm': (2, dict(router='softmax')),
  'softmax_plain': (3, dict(router='softmax', normalize_weights=False)),
  'sigmoid_bias': (2, dict(router='sigmoid', score_correction_bias=True)),
  'sigmoid_grouped_scaled': (
    3,
    dict(
      router='sigmoid',
      score_correction_bias=True,
      num_groups=4,
      groups_per_token=2,
      routed_scaling_factor=2.5,
    ),
  ),
  'sigmoid_plain': (2, dict(router='sigmoid', normalize_weights=False)),
}


def _logits():
  return jax.random.normal(jax.random.key(0), (T, E)) * 2


def _bias():
  return jax.random.normal(jax.random.key(1), (E,)) * 0.3


def ref_kwargs(kw, bias):
  out = dict(
    router=kw.get('router', 'softmax'),
    normalize=kw.get('normalize_weights', True),
    scale=kw.get('routed_scaling_factor', 1.0),
    num_groups=kw.get('num_groups'),
    groups_per_token=kw.get('groups_per_token'),
  )
  if kw.get('score_correction_bias'):
    out['bias'] = np.asarray(bias)
  return out


def jax_kwargs(kw, bias):
  kw = dict(kw)
  if kw.get('score_correction_bias'):
    kw['score_correction_bias'] = bias
  return kw


@pytest.mark.parametrize('name', sorted(ROUTER_CASES))
def test_top_k_routing_matches_reference(name):
  k, kw = ROUTER_CASES[name]
  logits, bias = _logits(), _bias()
  w, e = flaxact.top_k_routing(logits, k, **jax_kwargs(kw, bias))
  assert w.shape == e.shape == (T, k)
  assert w.dtype == jnp.float32 and e.dtype == jnp.int32
  for t in range(T):
    rw, re = ref.route(np.asarray(logits[t]), k, **ref_kwargs(kw, bias))
    np.testing.assert_array_equal(np.asarray(e[t]), re)
    np.testing.assert_allclose(np.asarray(w[t]), rw, **tol(jnp.float32))


def test_ties_go_to_the_lower_index_and_bf16_logits_route_in_f32():
  w, e = flaxact.top_k_routing(jnp.zeros((2, 6), jnp.bfloat16), 3)
  np.testing.assert_array_equal(np.asarray(e), [[0, 1, 2]] * 2)
  assert w.dtype == jnp.float32


def test_grouped_routing_excludes_other_groups():
  # group 1 holds the best single expert but group 0 the best top-two sum.
  logits = jnp.array([[2.0, 2.0, 3.0, -5.0]])
  _, e = flaxact.top_k_routing(
    logits, 1, router='sigmoid', num_groups=2, groups_per_token=1
  )
  assert int(e[0, 0]) == 0


def test_weights_carry_router_gradients_and_bias_gets_none():
  def f(logits, bias):
    w, _ = flaxact.top_k_routing(
      logits, 2, router='sigmoid', score_correction_bias=bias
    )
    return jnp.sum(w * jnp.arange(2.0)[None])

  g_logits, g_bias = jax.grad(f, argnums=(0, 1))(_logits(), _bias())
  assert float(jnp.abs(g_logits).sum()) > 0
  assert float(jnp.abs(g_bias).sum()) == 0
  check_grads(
    lambda z: flaxact.top_k_routing(z, 3)[0],
    (_logits(),),
    order=1,
    **GRAD_TOL[np.dtype(jnp.float32)],
  )


def test_load_balancing_loss_formula_and_balanced_value():
  logits = _logits()
  _, e = flaxact.top_k_routing(logits, 2)
  p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  f = np.zeros(E)
  for row in np.asarray(e):
    f[row] += 1
  expected = E * np.sum(f / T * p.mean(0))
  got = flaxact.load_balancing_loss(logits, e, E)
  np.testing.assert_allclose(float(got), expected, **tol(jnp.float32))
  balanced = jnp.arange(E).reshape(4, 2)
  loss = flaxact.load_balancing_loss(jnp.zeros((4, E)), balanced, E)
  assert float(loss) == pytest.approx(2.0)


def test_router_z_loss_formula():
  z = np.asarray(_logits(), np.float64)
  lse = np.log(np.exp(z).sum(-1))
  got = flaxact.router_z_loss(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(float(got), np.mean(lse**2), rtol=1e-6)


def test_update_score_correction_bias_moves_towards_equal_load():
  bias = jnp.array([0.1, 0.0, -0.1, 0.0])
  new = flaxact.update_score_correction_bias(
    bias, jnp.array([7, 1, 1, 3]), 0.01
  )
  chex.assert_trees_all_close(
    new, jnp.array([0.09, 0.01, -0.09, 0.0]), rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize(
  'call, exc, words',
  [
    (lambda: flaxact.top_k_routing(jnp.zeros((2, 4)), 0), ValueError, '[1,'),
    (lambda: flaxact.top_k_routing(jnp.zeros((2, 4)), 5), ValueError, 'got 5'),
    (
      lambda: flaxact.top_k_routing(jnp.zeros((2, 4)), 1, router='softmx'),
      ValueError,
      "Did you mean 'softmax'",
    ),
    (
      lambda: flaxact.top_k_routing(
        jnp.zeros((2, 6)),
        1,
        router='sigmoid',
        num_groups=4,
        groups_per_token=1,
      ),
      ValueError,
      'divide',
    ),
    (
      lambda: flaxact.top_k_routing(jnp.zeros((2, 4), jnp.int32), 1),
      TypeError,
      'int32',
    ),
    (
      lambda: flaxact.top_k_routing(jnp.zeros((2, 4)), 1.5),
      TypeError,
      'integer',
    ),
  ],
  ids=['k0', 'k_gt_e', 'router', 'groups', 'int_logits', 'float_k'],
)
def test_errors_name_expected_and_given(call, exc, words):
  with pytest.raises(exc, match=None) as info:
    call()
  assert words in str(info.value)


# ------------------------------------------------------------- gpt_oss_glu
def test_gpt_oss_glu_matches_reference_and_clamps():
  g = jnp.array([-3.0, -0.5, 0.0, 0.7, 6.9, 7.0, 12.0])
  u = jnp.array([-9.0, -1.0, 0.3, 2.0, 7.5, -7.0, 1.0])
  expected = ref.gpt_oss_glu(
    np.asarray(g, np.float64), np.asarray(u, np.float64)
  )
  np.testing.assert_allclose(
    np.asarray(flaxact.gpt_oss_glu(g, u)), expected, **tol(jnp.float32)
  )
  for dtype in (jnp.bfloat16, jnp.float16):
    assert flaxact.gpt_oss_glu(g.astype(dtype), u.astype(dtype)).dtype == dtype


def test_gpt_oss_glu_gradients():
  g = jnp.array([-3.0, -0.5, 0.2, 0.7, 6.0, 9.0])
  u = jnp.array([-9.0, -1.0, 0.3, 2.0, 6.5, 1.0])
  check_grads(
    flaxact.gpt_oss_glu, (g, u), order=1, **GRAD_TOL[np.dtype(jnp.float32)]
  )
  # past the clamps the gradients are exactly zero
  dg, du = jax.grad(lambda a, b: flaxact.gpt_oss_glu(a, b).sum(), (0, 1))(
    jnp.array([8.0]), jnp.array([9.0])
  )
  assert float(dg[0]) == 0.0 and float(du[0]) == 0.0
