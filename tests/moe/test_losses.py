"""Router losses with token masks, and DeepSeek-V3's sequence-wise loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxact
from tests.helpers import GRAD_TOL

B, S, E, K = 3, 6, 8, 2
# Row 0 half padding, row 1 all real, row 2 all padding.
MASK = np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6], bool)


def _logits(shape=(B, S, E), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 2


def _experts(logits, router='softmax'):
  return flaxact.top_k_routing(logits, K, router=router)[1]


def test_load_balancing_loss_matches_transformers_with_attention_mask():
  # transformers 5.25.0 Mixtral load_balancing_loss_func((logits,), 8, 2,
  # attention_mask) on these logits: without and with the mask.
  logits = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool).reshape(-1)
  experts = _experts(jnp.asarray(logits))
  plain = flaxact.load_balancing_loss(logits, experts, 8)
  masked = flaxact.load_balancing_loss(logits, experts, 8, token_mask=mask)
  np.testing.assert_allclose(float(plain), 2.2192864418029785, rtol=1e-6)
  np.testing.assert_allclose(float(masked), 2.1465892791748047, rtol=1e-6)


@pytest.mark.parametrize(
  'loss',
  [
    lambda z, e, m: flaxact.load_balancing_loss(z, e, E, token_mask=m),
    lambda z, e, m: flaxact.router_z_loss(z, token_mask=m),
  ],
  ids=['load_balancing', 'z'],
)
def test_masked_losses_equal_the_losses_without_the_padding(loss):
  logits = _logits()
  # Padding's logits may be anything: inf and nan must not leak in.
  logits = jnp.where(MASK[..., None], logits, jnp.nan)
  experts = _experts(jnp.nan_to_num(logits))
  got = loss(logits, experts, jnp.asarray(MASK))
  want = loss(logits[MASK], experts[MASK], None)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  grad = jax.grad(lambda z: loss(z, experts, jnp.asarray(MASK)))(logits)
  assert np.isfinite(grad).all()
  assert float(jnp.abs(grad[~MASK]).sum()) == 0


def test_masked_losses_without_real_tokens_are_zero():
  z, e = _logits((2, E)), jnp.zeros((2, K), jnp.int32)
  none = jnp.zeros((2,), bool)
  assert float(flaxact.load_balancing_loss(z, e, E, token_mask=none)) == 0
  assert float(flaxact.router_z_loss(z, token_mask=none)) == 0


def _sequence_reference(logits, experts, router, mask=None):
  """DeepSeek-V3 eqs. 17-20 in float64, one sequence at a time."""
  logits = np.asarray(logits, np.float64)
  experts = np.asarray(experts)
  b, s, e = logits.shape
  k = experts.shape[-1]
  mask = np.ones((b, s), bool) if mask is None else mask
  losses = []
  for z, ex, m in zip(logits, experts, mask, strict=True):
    z, ex = z[m], ex[m]
    t = len(z)
    if not t:
      continue
    if router == 'softmax':
      scores = np.exp(z - z.max(-1, keepdims=True))
    else:
      scores = 1 / (1 + np.exp(-z))
    scores = scores / scores.sum(-1, keepdims=True)
    f = np.array([e / (k * t) * np.sum(ex == i) for i in range(e)])
    p = scores.mean(0)
    losses.append(np.sum(f * p))
  return np.mean(losses) if losses else 0.0


@pytest.mark.parametrize('router', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('masked', [False, True], ids=['all', 'masked'])
def test_sequence_balance_loss_matches_the_paper(router, masked):
  logits = _logits()
  experts = _experts(logits, router)
  mask = MASK if masked else None
  got = flaxact.sequence_balance_loss(
    logits,
    experts,
    E,
    router=router,
    token_mask=None if mask is None else jnp.asarray(mask),
  )
  want = _sequence_reference(logits, experts, router, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_sequence_balance_loss_balanced_value_and_gradient():
  balanced = jnp.tile(jnp.arange(E).reshape(1, 4, K), (2, 1, 1))
  loss = flaxact.sequence_balance_loss(jnp.zeros((2, 4, E)), balanced, E)
  assert float(loss) == pytest.approx(1.0)
  experts = _experts(_logits())
  for router in ('softmax', 'sigmoid'):
    check_grads(
      lambda z, r=router: flaxact.sequence_balance_loss(
        z, experts, E, router=r, token_mask=jnp.asarray(MASK)
      ),
      (_logits(),),
      order=1,
      **GRAD_TOL[np.dtype(jnp.float32)],
    )


@pytest.mark.parametrize(
  'call, exc, words',
  [
    (
      lambda: flaxact.sequence_balance_loss(
        jnp.zeros((S, E)), jnp.zeros((S, K), jnp.int32), E
      ),
      ValueError,
      '(batch, seq, 8); got (6, 8)',
    ),
    (
      lambda: flaxact.sequence_balance_loss(
        jnp.zeros((B, S, E)), jnp.zeros((B, 5, K), jnp.int32), E
      ),
      ValueError,
      'got (3, 5, 2)',
    ),
    (
      lambda: flaxact.sequence_balance_loss(
        jnp.zeros((B, S, E)), jnp.zeros((B, S, K), jnp.int32), E, router='x'
      ),
      ValueError,
      'softmax',
    ),
    (
      lambda: flaxact.sequence_balance_loss(
        jnp.zeros((B, S, E)),
        jnp.zeros((B, S, K), jnp.int32),
        E,
        token_mask=jnp.ones((B, S), jnp.int32),
      ),
      TypeError,
      'got dtype int32',
    ),
    (
      lambda: flaxact.load_balancing_loss(
        jnp.zeros((S, E)),
        jnp.zeros((S, K), jnp.int32),
        E,
        token_mask=jnp.ones((S + 1,), bool),
      ),
      ValueError,
      'x.shape[:-1] = (6,); got (7,)',
    ),
    (
      lambda: flaxact.router_z_loss(
        jnp.zeros((S, E)), token_mask=jnp.ones((S,), jnp.float32)
      ),
      TypeError,
      'bool array',
    ),
  ],
  ids=['rank2', 'experts_shape', 'router', 'int_mask', 'mask_shape', 'f_mask'],
)
def test_loss_errors_name_expected_and_given(call, exc, words):
  with pytest.raises(exc) as info:
    call()
  assert words in str(info.value)
