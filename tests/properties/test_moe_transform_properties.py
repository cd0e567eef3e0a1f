"""Derivative properties of the routed FFN over generated configurations.

Forward mode (``jax.jvp``) and second order (grad of grad) agree across the
impls; gradients stay finite when an expert that no token chooses overflows
(the ``'dense'`` impl computes every expert on every token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, note
from hypothesis import strategies as st

import flaxact
from tests.properties import moe_configs as mc
from tests.properties import profiles
from tests.properties.moe_configs import IMPLS, configs

DIFF = ('x', 'router_kernel', 'gate_kernel', 'up_kernel', 'down_kernel')


@functools.cache
def _derivatives(static: tuple):
  """``(jvp tangent, grad of <grad <y, cot>, tangents>)`` of ``moe_ffn``."""

  def f(p, rest):
    return flaxact.moe_ffn(**p, **rest, **dict(static))[0]

  def run(p, rest, tangents, cot):
    _, tangent = jax.jvp(lambda p: f(p, rest), (p,), (tangents,))
    grad = jax.grad(lambda p: jnp.vdot(f(p, rest), cot))
    along = lambda p: sum(jnp.vdot(g, tangents[n]) for n, g in grad(p).items())
    return tangent, jax.grad(along)(p)

  return jax.jit(run)


def _close(got, want, name):
  # f32 second derivatives: sums of products of sums, relative to the
  # largest entry (entries near 0 cancel)
  size = max(1.0, float(np.max(np.abs(want), initial=0.0)))
  np.testing.assert_allclose(
    got, want, rtol=1e-4, atol=1e-4 * size, err_msg=name
  )


@profiles.ci_examples(2)
@given(configs(tokens=(1, 3, 13)))
def test_jvp_and_grad_of_grad_agree_across_impls(c):
  note(mc.moe_call(c) + "  # jvp and grad of grad, every impl vs 'dense'")
  w = mc.weights(c)
  p = {n: w[n] for n in DIFF}
  rest = {n: a for n, a in w.items() if n not in DIFF}
  ks = jax.random.split(jax.random.key(c['seed'] + 1), len(DIFF) + 1)
  tangents = {
    n: jax.random.normal(k, p[n].shape)
    for n, k in zip(DIFF, ks[:-1], strict=True)
  }
  cot = jax.random.normal(ks[-1], w['x'].shape)
  out = {}
  with jax.default_matmul_precision('highest'):
    for impl in IMPLS:
      static = tuple(mc.ffn_kwargs(c, impl=impl).items())
      out[impl] = _derivatives(static)(p, rest, tangents, cot)
  for impl in IMPLS[:-1]:
    tangent, second = out[impl]
    _close(tangent, out['dense'][0], f'{impl} jvp')
    for n in DIFF:
      _close(second[n], out['dense'][1][n], f'{impl} grad of grad {n}')


def _expert_output(c, w, j):
  """Expert ``j`` on every token, in the compute dtype."""
  x = w['x'].reshape(c['t'], c['d'])
  g, u = x @ w['gate_kernel'][j], x @ w['up_kernel'][j]
  if c['use_bias']:
    g, u = g + w['gate_bias'][j][None], u + w['up_bias'][j][None]
  hidden = mc.GPT_OSS(g, u) if c['gpt_oss'] else jax.nn.silu(g) * u
  return hidden @ w['down_kernel'][j]


@profiles.ci_examples(3)
@given(configs(dtypes=mc.DTYPES, tokens=(1, 3, 13)), st.sampled_from(IMPLS))
def test_gradients_stay_finite_when_an_unchosen_expert_overflows(c, impl):
  assume(c['e'] > 1)
  c = dict(c, k=min(c['k'], c['e'] - 1), router_bias=True)
  j = c['seed'] % c['e']
  note(mc.moe_call(c, impl=repr(impl)) + f'  # expert {j} overflows')
  w = mc.weights(c)
  big = jnp.finfo(c['dtype']).max
  w['router_kernel'] = w['router_kernel'].at[:, j].set(0.0)
  w['router_bias'] = w['router_bias'].at[j].set(-1e4)  # never chosen
  if c['router'] == 'sigmoid':
    bias = w['score_correction_bias'].at[j].set(-1e4)
    w['score_correction_bias'] = bias
  w['up_kernel'] = w['up_kernel'].at[j].set(big)
  w['down_kernel'] = w['down_kernel'].at[j].set(big)
  assume(not np.isfinite(mc.as_f64(_expert_output(c, w, j))).all())

  def loss(p):
    y, aux = mc.ffn_call(c, {**w, **p}, impl=impl, jit=False)
    return jnp.sum(y.astype(jnp.float32)), aux

  p = {n: w[n] for n in DIFF}
  with jax.default_matmul_precision('highest'):
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
  assert j not in np.asarray(aux.experts)
  assert np.isfinite(value)
  for n, g in grads.items():
    assert np.isfinite(mc.as_f64(g)).all(), n
