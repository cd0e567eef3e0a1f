"""``moe_ffn`` with a token mask, and its router jitter noise.

A padded batch with its padding masked must give what the same batch
without the padding gives: outputs on the real tokens, loads, drops and
losses, and gradients; every impl, with and without capacity, under jit,
and expert-parallel on 8 simulated devices (mesh ``data=2, expert=4``),
where each device also holds a quarter of every expert kernel's experts
axis and the compiled step moves tokens with all-to-all and never
all-gathers a kernel (the former ``tests/moe/test_expert_parallel.py``).
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxact
from tests.multidevice import run_on_simulated_devices

T, D, H, E, K = 12, 8, 16, 4, 2
MASK = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0], bool)
REAL = int(MASK.sum())  # 8
TOL = dict(rtol=1e-5, atol=1e-5)  # sums over other token counts reorder
IMPLS = ('loop', 'tiles', 'ragged', 'dense')
AUX = ('expert_load', 'dropped_tokens', 'load_balancing_loss', 'router_z_loss')


def _args():
  ks = jax.random.split(jax.random.key(0), 5)
  return (
    jax.random.normal(ks[0], (T, D)),
    jax.random.normal(ks[1], (D, E)),
    jax.random.normal(ks[2], (E, D, H)) / 3,
    jax.random.normal(ks[3], (E, D, H)) / 3,
    jax.random.normal(ks[4], (E, H, D)) / 4,
  )


def _loss(x, *w, mask=None, **kw):
  y, aux = flaxact.moe_ffn(
    x, *w, experts_per_token=K, tile_size=4, token_mask=mask, **kw
  )
  total = jnp.sum(jnp.sin(y) ** 2) + aux.load_balancing_loss
  return total + aux.router_z_loss, (y, aux)


@pytest.mark.parametrize('capacity', [None, 0.5], ids=['dropless', 'capacity'])
@pytest.mark.parametrize('impl', IMPLS)
def test_masked_batch_equals_the_batch_without_padding(impl, capacity):
  x, *w = _args()
  # The capacity counts every position: c * T here, c' * REAL there.
  unpadded = None if capacity is None else capacity * T / REAL
  grad = functools.partial(
    jax.value_and_grad, argnums=tuple(range(5)), has_aux=True
  )
  with jax.default_matmul_precision('highest'):
    run = jax.jit(
      grad(functools.partial(_loss, impl=impl, capacity_factor=capacity))
    )
    (val, (y, aux)), g = run(x, *w, mask=jnp.asarray(MASK))
    (want_val, (want_y, want_aux)), want_g = jax.jit(
      grad(functools.partial(_loss, impl=impl, capacity_factor=unpadded))
    )(x[MASK], *w)
  np.testing.assert_allclose(y[MASK], want_y, **TOL)
  assert float(jnp.abs(y[~MASK]).max()) == 0
  np.testing.assert_allclose(val, want_val, **TOL)
  for name in AUX:
    np.testing.assert_allclose(getattr(aux, name), getattr(want_aux, name))
  assert not aux.dropped[~MASK].any()
  if capacity is not None:
    assert int(aux.dropped_tokens) > 0  # the capacity binds
  np.testing.assert_allclose(g[0][MASK], want_g[0], **TOL)
  assert float(jnp.abs(g[0][~MASK]).max()) == 0  # no routed part there
  for got, want in zip(g[1:], want_g[1:], strict=True):
    np.testing.assert_allclose(got, want, **TOL)


def test_masked_tokens_reach_no_expert_and_keep_their_routing():
  x, *w = _args()
  call = jax.jit(functools.partial(flaxact.moe_ffn, experts_per_token=K))
  _, aux = call(x, *w, token_mask=jnp.asarray(MASK))
  _, plain = call(x, *w)
  np.testing.assert_array_equal(aux.experts, plain.experts)
  assert int(aux.expert_load.sum()) == REAL * K
  assert int(plain.expert_load.sum()) == T * K


def test_sigmoid_router_and_batched_tokens_with_a_mask():
  x, *w = _args()
  x3, m3 = x.reshape(2, 6, D), jnp.asarray(MASK.reshape(2, 6))
  kw = dict(experts_per_token=K, router='sigmoid', routed_scaling_factor=2.0)
  call = jax.jit(functools.partial(flaxact.moe_ffn, **kw))
  with jax.default_matmul_precision('highest'):
    y, aux = call(x3, *w, token_mask=m3)
    want, want_aux = call(x[MASK], *w)
    rows = [call(x3[i][m3[i]][None], *w)[1] for i in (0, 1)]
  np.testing.assert_allclose(y[m3], want, **TOL)
  np.testing.assert_allclose(
    aux.load_balancing_loss, want_aux.load_balancing_loss
  )
  seq = np.mean([float(r.sequence_balance_loss) for r in rows])
  np.testing.assert_allclose(float(aux.sequence_balance_loss), seq, rtol=1e-6)


def test_router_jitter_noise_multiplies_the_router_input_only():
  x, *w = _args()
  key, eps = jax.random.key(3), 0.2
  with jax.default_matmul_precision('highest'):
    y, aux = flaxact.moe_ffn(
      x, *w, experts_per_token=K, router_jitter_noise=eps, key=key
    )
    again, _ = flaxact.moe_ffn(
      x, *w, experts_per_token=K, router_jitter_noise=eps, key=key
    )
    u = jax.random.uniform(key, x.shape, jnp.float32, 1 - eps, 1 + eps)
    logits = (x * u) @ w[0]
    want, _ = flaxact.moe_ffn(x, *w, experts_per_token=K, router_logits=logits)
    plain, plain_aux = flaxact.moe_ffn(x, *w, experts_per_token=K)
  np.testing.assert_array_equal(y, again)  # a fixed key reproduces it
  np.testing.assert_allclose(aux.router_logits, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)  # experts: x
  assert not np.allclose(aux.router_logits, plain_aux.router_logits)
  assert float(u.min()) >= 1 - eps and float(u.max()) <= 1 + eps
  # eps = 0 with a key: no noise at all, bit for bit.
  zero, _ = flaxact.moe_ffn(x, *w, experts_per_token=K, key=key)
  np.testing.assert_array_equal(zero, plain)


@pytest.mark.parametrize(
  'kw, exc, words',
  [
    (dict(token_mask=jnp.ones((T, 1), bool)), ValueError, 'got (12, 1)'),
    (dict(token_mask=jnp.ones((T,), jnp.int32)), TypeError, 'dtype int32'),
    (dict(router_jitter_noise=-0.1, key=jax.random.key(0)), ValueError, '-0.1'),
    (
      dict(router_jitter_noise=1.0, key=jax.random.key(0)),
      ValueError,
      '[0, 1)',
    ),
    (dict(router_jitter_noise='x'), TypeError, "'x'"),
    (dict(router_jitter_noise=0.1), ValueError, 'key=None'),
    (
      dict(
        router_jitter_noise=0.1,
        key=jax.random.key(0),
        router_logits=jnp.zeros((T, E)),
      ),
      ValueError,
      'router_logits',
    ),
  ],
  ids=['shape', 'dtype', 'negative', 'one', 'str', 'no_key', 'logits'],
)
def test_mask_and_noise_errors_name_expected_and_given(kw, exc, words):
  with pytest.raises(exc) as info:
    flaxact.moe_ffn(*_args(), experts_per_token=K, **kw)
  assert words in str(info.value)


EP_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  import flaxact
  from tests.multidevice import require_devices

  require_devices(8)
  mesh = jax.make_mesh((2, 4), ('data', 'expert'))
  T, D, H, E, K = 64, 16, 24, 8, 2
  ks = jax.random.split(jax.random.key(0), 6)
  args = (
    jax.random.normal(ks[0], (T, D)), jax.random.normal(ks[1], (D, E)),
    jax.random.normal(ks[2], (E, D, H)) / 4,
    jax.random.normal(ks[3], (E, D, H)) / 4,
    jax.random.normal(ks[4], (E, H, D)) / 5,
  )
  mask = jax.random.bernoulli(ks[5], 0.7, (T,))
  specs = (P(('data', 'expert')), P(), P('expert'), P('expert'), P('expert'))

  def loss(*a, mesh=None, impl='loop'):
    y, aux = flaxact.moe_ffn(*a, experts_per_token=K, mesh=mesh, impl=impl,
                             tile_size=8, token_mask=mask)
    return jnp.sum(y ** 2) + aux.load_balancing_loss, (y, aux.expert_load)

  with jax.default_matmul_precision('highest'):
    grad = lambda f: jax.value_and_grad(f, argnums=tuple(range(5)),
                                        has_aux=True)
    (ref, (ref_y, ref_load)), ref_g = jax.jit(grad(loss))(*args)
    put = [jax.device_put(a, NamedSharding(mesh, s))
           for a, s in zip(args, specs)]
    for impl in ('loop', 'ragged'):
      step = jax.jit(grad(lambda *a: loss(*a, mesh=mesh, impl=impl)))
      (val, (y, load)), g = step(*put)
      np.testing.assert_allclose(val, ref, rtol=1e-5)
      y, m = np.asarray(y), np.asarray(mask)
      np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
      assert np.abs(y[~m]).max() == 0
      np.testing.assert_array_equal(load, ref_load)
      assert int(load.sum()) == int(m.sum()) * K
      for a, b in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   rtol=1e-4, atol=1e-5)
      for a in g[2:]:  # each device holds a quarter of the experts
        assert a.sharding.spec[0] == 'expert', a.sharding
        assert a.addressable_shards[0].data.shape[0] == E // 4
      # tokens move with all-to-all; no expert kernel is all-gathered
      hlo = step.lower(*put).compile().as_text()
      assert 'all-to-all' in hlo
      for line in hlo.splitlines():
        if ' all-gather(' in line:
          shape = line.split('=')[1].split('all-gather')[0]
          assert f'{D},{H}' not in shape and f'{H},{D}' not in shape, line
  print('EP MASK OK')
  """
)


def test_token_mask_under_expert_parallelism_on_8_simulated_devices():
  done = run_on_simulated_devices('-c', EP_SCRIPT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'EP MASK OK' in done.stdout
