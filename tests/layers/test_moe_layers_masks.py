"""The ``MoE`` layers with token masks, jitter noise and per-call records.

A padded ``(batch, seq, d)`` batch with its padding masked gives what the
batch without its padding gives: outputs on the real tokens, the recorded
loads, drops and losses (``sequence_balance_loss`` per sequence), and the
weights' gradients; every impl, Linen and NNX, under ``jit``, and the NNX
layer expert-parallel on 8 simulated devices.
"""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxact
from flaxact import linen as fl
from flaxact import nnx as fx
from tests import moe_layer_helpers as mh
from tests.multidevice import run_on_simulated_devices

TOL = dict(rtol=1e-5, atol=1e-5)  # sums over other token counts reorder
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], bool)
REAL = int(MASK.sum())


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _x():
  return mh.x_input().reshape(2, 6, mh.D)


def _run(framework, layer, x, mask=None, **call):
  """``(y, recorded, grads)`` of ``sum(sin(y)**2) + losses``, jitted.

  ``grads`` are the weights' and ``x``'s.
  """
  if framework == 'nnx':
    graphdef, state = nnx.split(layer)

    def loss(state, x):
      y, rec = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(
        x, token_mask=mask, **call
      )
      rec = {k: v[0] for k, v in nnx.to_pure_dict(rec).items()}
      return _total(y, rec), (y, rec)

    params = state
  else:
    variables = mh.variables_of(layer)
    case, kw = layer.case
    linen = mh.linen_layer(case, **kw)

    def loss(params, x):
      y, state = linen.apply(
        params, x, token_mask=mask, mutable=['intermediates'], **call
      )
      rec = {k: v[0] for k, v in state['intermediates'].items()}
      return _total(y, rec), (y, rec)

    params = variables
  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (y, rec)), grads = jax.jit(grad)(params, x)
  return y, rec, grads


def _total(y, rec):
  # Not sequence_balance_loss: the unpadded batch is one flat sequence.
  return (
    jnp.sum(jnp.sin(y) ** 2) + rec['load_balancing_loss'] + rec['router_z_loss']
  )


def _layer(case, **kw):
  layer = mh.nnx_layer(case, **kw)
  layer.case = nnx.data((case, kw))  # for the Linen twin  # pyright: ignore
  return layer


# Each impl once, each framework twice: the impls' masking is checked one by
# one in tests/moe/test_token_mask.py; here, that both layers pass it on.
@pytest.mark.parametrize(
  'framework, impl',
  [('nnx', 'loop'), ('linen', 'tiles'), ('nnx', 'ragged'), ('linen', 'dense')],
)
def test_masked_batch_equals_the_batch_without_padding(framework, impl):
  layer = _layer('sigmoid_scaled', impl=impl)
  x, m = _x(), jnp.asarray(MASK)
  y, rec, (g, gx) = _run(framework, layer, x, m)
  want_y, want_rec, (want_g, _) = _run(framework, layer, x[m])
  np.testing.assert_allclose(y[m], want_y, **TOL)
  assert float(jnp.abs(y[~m]).max()) == 0
  for name in ('load_balancing_loss', 'router_z_loss', 'expert_load'):
    np.testing.assert_allclose(rec[name], want_rec[name], rtol=1e-6)
  logits = x @ layer.router.kernel[...]
  _, experts = flaxact.top_k_routing(
    logits,
    mh.K,
    router='sigmoid',
    score_correction_bias=layer.score_correction_bias[...],
  )
  seq = np.mean(
    [
      flaxact.sequence_balance_loss(
        logits[i][m[i]][None], experts[i][m[i]][None], mh.E, router='sigmoid'
      )
      for i in (0, 1)
    ]
  )
  np.testing.assert_allclose(rec['sequence_balance_loss'], seq, rtol=1e-5)
  assert float(jnp.abs(gx[~m]).max()) == 0  # no routed part, no shared
  for got, want in zip(
    jax.tree.leaves(g), jax.tree.leaves(want_g), strict=True
  ):
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_equals_nnx_with_a_mask_and_the_shared_expert_runs_on_padding():
  layer = _layer('shared')
  x, m = _x(), jnp.asarray(MASK)
  y, rec, _ = _run('nnx', layer, x, m)
  y_linen, rec_linen, _ = _run('linen', layer, x, m)
  np.testing.assert_array_equal(y_linen, y)
  for name, value in rec.items():
    np.testing.assert_array_equal(rec_linen[name], value)
  shared = jax.jit(lambda x: layer.shared_expert(x))(x)
  np.testing.assert_allclose(y[~m], shared[~m], rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(y[~m]).min()) > 0


@pytest.mark.parametrize('framework', ['nnx', 'linen'])
def test_capacity_ranks_skip_masked_tokens(framework):
  # The capacity counts every position: c * 12 here, c' * REAL there.
  layer = _layer('capacity', impl='loop')
  unpadded = _layer('capacity', impl='loop', capacity_factor=0.5 * 12 / REAL)
  x, m = _x(), jnp.asarray(MASK)
  y, rec, _ = _run(framework, layer, x, m)
  want_y, want_rec, _ = _run(framework, unpadded, x[m])
  assert int(want_rec['dropped_assignments']) > 0
  assert int(rec['dropped_assignments']) == int(want_rec['dropped_assignments'])
  np.testing.assert_allclose(y[m], want_y, **TOL)


def test_dropped_assignments_are_recorded_per_call():
  layer = mh.nnx_layer('capacity', impl='loop')
  x, m = _x(), jnp.asarray(MASK)

  @nnx.jit
  def twice(layer, x):
    def f(layer, x):
      layer(x)
      layer(x, token_mask=m)
      return layer(x[:1])

    return nnx.capture(f, nnx.Intermediate)(layer, x)[1]

  counts = [int(c) for c in twice(layer, x)['dropped_assignments']]
  _, one = flaxact.moe_ffn(
    x[:1], layer.router.kernel[...], layer.gate_proj.kernel[...],
    layer.up_proj.kernel[...], layer.down_proj.kernel[...],
    experts_per_token=mh.K, capacity_factor=0.5,
  )  # fmt: skip
  assert len(counts) == 3  # one per call, not a running total
  assert counts[0] > counts[1] > 0  # masked tokens are never dropped
  assert counts[2] == int(one.dropped_tokens)


def test_nnx_jitter_noise_is_moe_ffns_on_the_router_input():
  eps, key = 0.3, jax.random.key(7)
  noisy = mh.nnx_layer('softmax', router_jitter_noise=eps)
  x = mh.x_input()
  # jitted calls (eager dispatch is slow); nnx.jit carries the rng stream
  call = nnx.jit(lambda m, x: m(x))
  y = nnx.jit(lambda m, x, key: m(x, rngs=key))(noisy, x, key)
  w = [
    getattr(noisy, n).kernel[...]
    for n in ('router', 'gate_proj', 'up_proj', 'down_proj')
  ]
  want, _ = jax.jit(
    lambda *a: flaxact.moe_ffn(
      *a, experts_per_token=mh.K, router_jitter_noise=eps, key=key
    )
  )(x, *w)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  plain = call(mh.nnx_layer('softmax'), x)
  assert not np.allclose(y, plain)
  deterministic = nnx.jit(lambda m, x: m(x, deterministic=True))
  np.testing.assert_array_equal(deterministic(noisy, x), plain)
  noisy.eval()
  np.testing.assert_array_equal(call(noisy, x), plain)
  noisy.train()  # the 'default' stream kept at construction
  first, second = call(noisy, x), call(noisy, x)
  assert not np.array_equal(first, second)  # the stream moves on
  again = mh.nnx_layer('softmax', router_jitter_noise=eps)
  np.testing.assert_array_equal(call(again, x), first)  # reproducible


def test_linen_jitter_noise_follows_deterministic_and_the_dropout_rng():
  layer = _layer('softmax')
  variables = mh.variables_of(layer)
  x = mh.x_input()
  plain = mh.linen_layer('softmax').apply(variables, x)
  noisy = mh.linen_layer('softmax', router_jitter_noise=0.3)
  rng = {'dropout': jax.random.key(1)}
  np.testing.assert_array_equal(
    noisy.apply(variables, x, deterministic=True), plain
  )
  train = noisy.apply(variables, x, deterministic=False, rngs=rng)
  assert not np.allclose(train, plain)
  np.testing.assert_array_equal(
    noisy.apply(variables, x, deterministic=False, rngs=rng), train
  )
  # One expert: the routing weight is 1 whatever the router sees, so the
  # output shows the experts' input is not jittered.
  one = fl.MoE(mh.H, 1, 1, router_jitter_noise=0.3, deterministic=False)
  v = one.init({'params': jax.random.key(0), 'dropout': rng['dropout']}, x)
  np.testing.assert_array_equal(
    one.apply(v, x, rngs=rng), one.apply(v, x, deterministic=True)
  )


@pytest.mark.parametrize(
  'call, exc, words',
  [
    (
      lambda: mh.linen_layer('softmax').init(
        jax.random.key(0), _x(), token_mask=jnp.ones((2, 5), bool)
      ),
      ValueError,
      'x.shape[:-1] = (2, 6); got (2, 5)',
    ),
    (
      lambda: mh.nnx_layer('softmax')(_x(), token_mask=jnp.ones((2, 6))),
      TypeError,
      'got dtype float32',
    ),
    (
      lambda: mh.nnx_layer('softmax')(_x(), token_mask=jnp.ones((12,), bool)),
      ValueError,
      'got (12,)',
    ),
    (
      lambda: fx.MoE(8, 16, 4, 2, router_jitter_noise=-1, rngs=nnx.Rngs(0)),
      ValueError,
      'got -1',
    ),
    (
      lambda: fl.MoE(16, 4, 2, router_jitter_noise=float('nan')).init(
        jax.random.key(0), _x()
      ),
      ValueError,
      '[0, 1)',
    ),
    (
      lambda: fl.MoE(16, 4, 2, router_jitter_noise=0.1).init(
        jax.random.key(0), _x()
      ),
      ValueError,
      'deterministic=True (inference) or deterministic=False',
    ),
    (
      lambda: fl.MoE(16, 4, 2, router_jitter_noise=0.1).init(
        jax.random.key(0), _x(), deterministic=False
      ),
      ValueError,
      "needs a 'dropout' rng",
    ),
    (
      lambda: fx.MoE(
        8, 16, 4, 2, router_jitter_noise=0.1, rngs=nnx.Rngs(params=0)
      )(_x()),
      ValueError,
      'needs an rng',
    ),
  ],
  ids=[
    'linen_shape',
    'nnx_dtype',
    'nnx_flat_shape',
    'nnx_negative',
    'linen_nan',
    'linen_no_deterministic',
    'linen_no_rng',
    'nnx_no_rng',
  ],
)
def test_errors_name_expected_and_given(call, exc, words):
  with pytest.raises(exc) as info:
    call()
  assert words in str(info.value)


def test_linen_variables_are_unchanged_by_the_new_options():
  shapes = jax.eval_shape(
    fl.MoE(16, 4, 2, router_jitter_noise=0.1, deterministic=True).init,
    jax.random.key(0),
    _x(),
  )
  plain = jax.eval_shape(fl.MoE(16, 4, 2).init, jax.random.key(0), _x())
  assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(
    nn.unbox(plain)
  )


EP_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from flaxact import nnx as fx
  from tests.multidevice import auto_mesh, require_devices

  require_devices(8)
  T, D, H, E, K = 32, 8, 16, 8, 2
  x = jax.random.normal(jax.random.key(1), (4, 8, D))
  mask = jax.random.bernoulli(jax.random.key(2), 0.6, (4, 8))

  def loss(graphdef, state, x):
    y, rec = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(
        x, token_mask=mask)
    rec = nnx.to_pure_dict(rec)
    aux = rec['load_balancing_loss'][0] + rec['sequence_balance_loss'][0]
    return jnp.sum(jnp.sin(y) ** 2) + aux, (y, rec['expert_load'][0])

  grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True),
                 static_argnums=0)
  make = lambda: fx.MoE(D, H, E, K, impl='loop', rngs=nnx.Rngs(0))
  with jax.default_matmul_precision('highest'):
    graphdef, state = nnx.split(make())
    (want, (want_y, want_load)), want_g = grad(graphdef, state, x)
    mesh = auto_mesh((2, 4), ('data', 'expert'))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(fx.EXPERT_PARALLEL_RULES):
      graphdef, state = nnx.split(make())
      (got, (y, load)), g = grad(graphdef, state, x)
      hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, token_mask=mask)
                    ).lower(state, x).compile().as_text()
  assert 'all-to-all' in hlo
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y)[~np.asarray(mask)]).max() == 0
  np.testing.assert_array_equal(load, want_load)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                               rtol=1e-4, atol=1e-5)
  print('LAYER EP MASK OK')
  """
)


def test_token_mask_expert_parallel_layer_on_8_simulated_devices():
  done = run_on_simulated_devices('-c', EP_SCRIPT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'LAYER EP MASK OK' in done.stdout
