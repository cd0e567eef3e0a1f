"""Properties of the routed FFN over generated configurations.

Each example draws a configuration from small sets of sizes (so that
compilations are shared between examples) and checks several properties at
once. A failure prints the configuration as a ready-to-paste ``MoE(...)``
call (``note``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, note, settings
from hypothesis import strategies as st

import flaxact
from tests import moe_reference as ref

IMPLS = ('loop', 'tiles', 'ragged', 'dense')
# f32 sums of d*h products against a float64 reference (tests/moe)
F32_FFN = dict(rtol=2e-5, atol=2e-5)


@st.composite
def configs(draw):
  e = draw(st.sampled_from([1, 2, 4, 8]))
  k = draw(st.integers(1, e))
  router = draw(st.sampled_from(['softmax', 'sigmoid']))
  groups = None
  if router == 'sigmoid' and e >= 4 and k <= e // 2:
    groups = draw(st.sampled_from([None, (2, 1), (2, 2)]))
  return dict(
    t=draw(st.sampled_from([0, 1, 3, 13])),
    lead=draw(st.sampled_from([(), (1,)])),
    d=draw(st.sampled_from([1, 8])),
    h=draw(st.sampled_from([1, 16])),
    e=e,
    k=k,
    router=router,
    groups=groups,
    normalize=draw(st.booleans()),
    capacity=draw(st.sampled_from([None, 0.25, 1.0, 4.0])),
    seed=draw(st.integers(0, 2**16)),
  )


def moe_call(c) -> str:
  """The configuration as a ready-to-paste NNX ``MoE(...)`` call."""
  groups = c['groups'] or (None, None)
  return (
    f'fx.MoE({c["d"]}, {c["h"]}, {c["e"]}, {c["k"]}, router={c["router"]!r},'
    f' normalize_weights={c["normalize"]}, num_groups={groups[0]},'
    f' groups_per_token={groups[1]}, capacity_factor={c["capacity"]},'
    f' rngs=nnx.Rngs({c["seed"]}))  # x: {(*c["lead"], c["t"], c["d"])}'
  )


def weights(c):
  ks = jax.random.split(jax.random.key(c['seed']), 6)
  d, h, e = c['d'], c['h'], c['e']
  n = lambda i, s, scale: jax.random.normal(ks[i], s) * scale
  x = n(0, (*c['lead'], c['t'], d), 1.0)
  kernels = (
    n(1, (d, e), 1.0),
    n(2, (e, d, h), d**-0.5),
    n(3, (e, d, h), d**-0.5),
    n(4, (e, h, d), h**-0.5),
  )
  bias = n(5, (e,), 0.3) if c['router'] == 'sigmoid' else None
  return x, kernels, bias


def _routing(c, bias):
  groups = c['groups'] or (None, None)
  return dict(
    router=c['router'],
    normalize_weights=c['normalize'],
    score_correction_bias=bias,
    num_groups=groups[0],
    groups_per_token=groups[1],
  )


@functools.partial(
  jax.jit,
  static_argnames=('k', 'impl', 'capacity', 'router', 'normalize', 'groups'),
)
def _run(x, kernels, bias, *, k, impl, capacity, router, normalize, groups):
  c = dict(router=router, normalize=normalize, groups=groups)
  return flaxact.moe_ffn(
    x,
    *kernels,
    experts_per_token=k,
    impl=impl,
    capacity_factor=capacity,
    tile_size=4,
    **_routing(c, bias),
  )


def run(c, x, kernels, bias, impl, capacity='same'):
  return _run(
    x,
    kernels,
    bias,
    k=c['k'],
    impl=impl,
    capacity=c['capacity'] if capacity == 'same' else capacity,
    router=c['router'],
    normalize=c['normalize'],
    groups=c['groups'],
  )


@given(configs())
def test_every_impl_matches_the_float64_reference(c):
  note(moe_call(c))
  x, kernels, bias = weights(c)
  groups = c['groups'] or (None, None)
  kw = dict(router=c['router'], normalize=c['normalize'])
  if c['router'] == 'sigmoid':
    kw.update(bias=np.asarray(bias, np.float64))
  if groups[0] is not None:
    kw.update(num_groups=groups[0], groups_per_token=groups[1])
  flat = np.asarray(x, np.float64).reshape(c['t'], c['d'])
  want, _, dropped = ref.moe(
    flat,
    *(np.asarray(a, np.float64) for a in kernels),
    c['k'],
    capacity_factor=c['capacity'],
    **kw,
  )
  with jax.default_matmul_precision('highest'):
    for impl in IMPLS:
      y, aux = run(c, x, kernels, bias, impl)
      assert y.shape == x.shape and y.dtype == x.dtype
      np.testing.assert_allclose(
        np.asarray(y).reshape(c['t'], c['d']),
        want.reshape(c['t'], c['d']),
        **F32_FFN,
        err_msg=impl,
      )
      np.testing.assert_array_equal(
        np.asarray(aux.dropped).reshape(dropped.shape), dropped
      )
      assert int(aux.expert_load.sum()) == c['t'] * c['k']
      assert np.isfinite([aux.load_balancing_loss, aux.router_z_loss]).all()
    # more capacity never drops more
    more = None if c['capacity'] is None else 2 * c['capacity']
    _, aux_more = run(c, x, kernels, bias, 'loop', capacity=more)
    assert int(aux_more.dropped_tokens) <= int(aux.dropped_tokens)


@given(configs(), st.data())
def test_dropless_rows_are_independent(c, data):
  c = dict(c, capacity=None, lead=())
  note(moe_call(c))
  x, kernels, bias = weights(c)
  impl = data.draw(st.sampled_from(IMPLS))
  with jax.default_matmul_precision('highest'):
    y, _ = run(c, x, kernels, bias, impl)
    if c['t'] == 0:
      return
    perm = np.asarray(data.draw(st.permutations(range(c['t']))))
    yp, _ = run(c, x[perm], kernels, bias, impl)
    np.testing.assert_allclose(yp, y[perm], **F32_FFN)
    row = data.draw(st.integers(0, c['t'] - 1))
    yn, _ = run(c, x.at[row, 0].set(jnp.nan), kernels, bias, impl)
    others = np.arange(c['t']) != row
    np.testing.assert_allclose(yn[others], y[others], **F32_FFN)


@settings(max_examples=10)
@given(
  st.sampled_from(IMPLS),
  st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_transforms_agree_and_gradients_stay_finite(impl, dtype):
  c = dict(
    t=5,
    lead=(),
    d=8,
    h=16,
    e=4,
    k=2,
    router='softmax',
    groups=None,
    normalize=True,
    capacity=None,
    seed=0,
  )
  note(moe_call(c) + f'  impl={impl!r}, dtype={jnp.dtype(dtype).name}')
  x, kernels, _ = weights(c)
  x, kernels = x.astype(dtype), tuple(a.astype(dtype) for a in kernels)
  f = lambda x, *w: flaxact.moe_ffn(
    x, *w, experts_per_token=2, impl=impl, tile_size=4
  )[0]
  g = lambda x, *w: flaxact.moe_ffn(x, *w, experts_per_token=2, impl='dense')[0]
  xs = jnp.stack([x, -x])
  tol = (
    dict(rtol=2e-5, atol=2e-5)
    if dtype == jnp.float32
    else dict(rtol=5e-2, atol=5e-2)
  )  # half precision: bf16/f16 rounding of 2 matmuls
  with jax.default_matmul_precision('highest'):
    batched = jax.jit(jax.vmap(f, in_axes=(0, *(None,) * 4)))(xs, *kernels)
    for i in range(2):
      np.testing.assert_allclose(
        np.asarray(batched[i], np.float32),
        np.asarray(f(xs[i], *kernels), np.float32),
        **tol,
      )
    if dtype != jnp.float32:
      return
    tangent = jax.jit(lambda *w: jax.jvp(f, w, w)[1])(x, *kernels)
    want = jax.jit(lambda *w: jax.jvp(g, w, w)[1])(x, *kernels)
    np.testing.assert_allclose(tangent, want, **tol)
    # an unchosen expert that overflows leaves the gradients finite
    up = kernels[2].at[3].set(1e30)
    router = kernels[0].at[:, 3].set(-1e4)
    grads = jax.jit(jax.grad(lambda *w: f(*w).sum(), argnums=(0, 1, 2, 3)))(
      jnp.abs(x), router, kernels[1], up, kernels[3]
    )
    for a in grads:
      assert np.isfinite(np.asarray(a)).all()
