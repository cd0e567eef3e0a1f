"""Generated MoE configurations shared by the MoE properties.

A configuration is a plain dict drawn from small sets of sizes (so that
compilations are shared between examples). :func:`layer_kwargs` turns it
into the ``MoE`` keyword arguments and :func:`moe_call` into a ready-to-paste
``fx.MoE(...)`` call, which every property ``note``s first: a failure prints
the shrunk configuration. :func:`weights` draws the arrays from the seed,
:func:`reference` is the float64 output (``tests/moe_reference.py``) and
:func:`ffn_call` the matching :func:`flaxact.moe_ffn` call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import flaxact
from tests import moe_reference as ref
from tests.helpers import TOL
from tests.properties.profiles import PROFILE

IMPLS = ('loop', 'tiles', 'ragged', 'dense')
DTYPES = ('float32', 'bfloat16', 'float16')
GPT_OSS = functools.partial(flaxact.gpt_oss_glu, alpha=1.702, limit=7.0)
_GPT_OSS_SRC = 'functools.partial(flaxact.gpt_oss_glu, alpha=1.702, limit=7.0)'
# f32 sums of d*h products against a float64 reference (tests/moe)
F32_FFN = dict(rtol=2e-5, atol=2e-5)
# CI draws sizes from small sets (examples share their compilations); the
# thorough profile adds the full ranges: up to 300 tokens, widths
# and hidden sizes up to 64, up to 16 experts.
WIDE = PROFILE == 'thorough'
EXPERTS = [1, 2, 4, 8, 16] if WIDE else [1, 2, 4, 8]
WIDTHS = [1, 8, 33, 64] if WIDE else [1, 8]
HIDDEN = [1, 16, 64] if WIDE else [1, 16]
MORE_TOKENS = (64, 300) if WIDE else ()


@st.composite
def configs(draw, dtypes=('float32',), shared=False, tokens=(0, 1, 3, 13)):
  """A routed FFN configuration (``shared``: also a shared expert)."""
  e = draw(st.sampled_from(EXPERTS))
  k = draw(st.integers(1, e))
  router = draw(st.sampled_from(['softmax', 'sigmoid']))
  groups = None
  if router == 'sigmoid' and e >= 4 and k <= e // 2:
    groups = draw(st.sampled_from([None, (2, 1), (2, 2)]))
  c = dict(
    t=draw(st.sampled_from((*tokens, *MORE_TOKENS))),
    lead=draw(st.sampled_from([(), (1,)])),
    d=draw(st.sampled_from(WIDTHS)),
    h=draw(st.sampled_from(HIDDEN)),
    e=e,
    k=k,
    router=router,
    groups=groups,
    normalize=draw(st.booleans()),
    scale=draw(st.sampled_from([1.0, 2.5])),
    capacity=draw(st.sampled_from([None, 0.25, 1.0, 4.0])),
    gpt_oss=draw(st.booleans()),
    use_bias=draw(st.booleans()),
    router_bias=draw(st.booleans()),
    dtype=draw(st.sampled_from(dtypes)),
    shared=None,
    shared_gate=False,
    seed=draw(st.integers(0, 2**16)),
  )
  if shared:
    c['shared'] = draw(st.sampled_from([None, 4]))
    c['shared_gate'] = c['shared'] is not None and draw(st.booleans())
  return c


def layer_kwargs(c) -> dict:
  """The ``MoE`` keyword arguments of ``c`` (sizes and rngs excluded)."""
  groups = c['groups'] or (None, None)
  return dict(
    router=c['router'],
    normalize_weights=c['normalize'],
    routed_scaling_factor=c['scale'],
    num_groups=groups[0],
    groups_per_token=groups[1],
    capacity_factor=c['capacity'],
    gated_product=GPT_OSS if c['gpt_oss'] else None,
    use_bias=c['use_bias'],
    router_use_bias=c['router_bias'],
    shared_hidden_features=c['shared'],
    shared_expert_gate=c['shared_gate'],
  )


def moe_call(c, **extra: str) -> str:
  """The configuration as a ready-to-paste NNX ``MoE(...)`` call.

  ``extra``: more keyword arguments, each value as source text.
  """
  args = ', '.join(
    [
      f'{n}={_GPT_OSS_SRC if v is GPT_OSS else repr(v)}'
      for n, v in layer_kwargs(c).items()
    ]
    + [f'{n}={v}' for n, v in extra.items()]
  )
  shape = (*c['lead'], c['t'], c['d'])
  return (
    f'fx.MoE({c["d"]}, {c["h"]}, {c["e"]}, {c["k"]}, {args},'
    f' rngs=nnx.Rngs({c["seed"]}))'
    f'  # x: {shape} {c["dtype"]}; weights: moe_configs.weights(c)'
  )


def weights(c) -> dict:
  """``moe_ffn``'s array arguments of ``c``, drawn from its seed.

  ``x`` and the experts' kernels and biases are in ``c['dtype']``; the
  router's arrays stay float32 (the layers' router computes in float32).
  """
  ks = iter(jax.random.split(jax.random.key(c['seed']), 10))
  d, h, e, dtype = c['d'], c['h'], c['e'], c['dtype']
  n = lambda s, scale: jax.random.normal(next(ks), s) * scale
  w = dict(
    x=n((*c['lead'], c['t'], d), 1.0),
    router_kernel=n((d, e), 1.0),
    gate_kernel=n((e, d, h), d**-0.5),
    up_kernel=n((e, d, h), d**-0.5),
    down_kernel=n((e, h, d), h**-0.5),
    router_bias=n((e,), 0.5) if c['router_bias'] else None,
    score_correction_bias=n((e,), 0.3) if c['router'] == 'sigmoid' else None,
  )
  for name, shape in (('gate_bias', (e, h)), ('up_bias', (e, h))):
    w[name] = n(shape, 0.3) if c['use_bias'] else None
  w['down_bias'] = n((e, d), 0.3) if c['use_bias'] else None
  half = ('x', 'gate_kernel', 'up_kernel', 'down_kernel')
  for name in (*half, 'gate_bias', 'up_bias', 'down_bias'):
    if w[name] is not None:
      w[name] = w[name].astype(dtype)
  return w


def ffn_kwargs(c, capacity='same', impl='loop') -> dict:
  """``moe_ffn``'s static keyword arguments of ``c``."""
  kw = layer_kwargs(c)
  for name in ('use_bias', 'router_use_bias', 'shared_hidden_features'):
    del kw[name]
  del kw['shared_expert_gate']
  if capacity != 'same':
    kw['capacity_factor'] = capacity
  return dict(kw, experts_per_token=c['k'], impl=impl, tile_size=4)


@functools.cache
def _jitted(static: tuple):
  return jax.jit(functools.partial(flaxact.moe_ffn, **dict(static)))


def ffn_call(c, w, *, jit=True, **kw):
  """``moe_ffn(**w)`` of ``c`` (``kw``: ``capacity``, ``impl``)."""
  static = ffn_kwargs(c, **kw)
  if jit:
    return _jitted(tuple(static.items()))(**w)
  return flaxact.moe_ffn(**w, **static)


def reference(c, w):
  """``(y, dropped)`` of the float64 reference, ``y`` of shape ``(T, d)``."""
  f64 = {
    n: None if a is None else np.asarray(a, np.float64) for n, a in w.items()
  }
  groups = c['groups'] or (None, None)
  kw = dict(router=c['router'], normalize=c['normalize'], scale=c['scale'])
  if c['router'] == 'sigmoid':
    kw.update(bias=f64['score_correction_bias'])
  if groups[0] is not None:
    kw.update(num_groups=groups[0], groups_per_token=groups[1])
  y, _, dropped = ref.moe(
    f64['x'].reshape(c['t'], c['d']),
    f64['router_kernel'],
    f64['gate_kernel'],
    f64['up_kernel'],
    f64['down_kernel'],
    c['k'],
    router_bias=f64['router_bias'],
    biases=(f64['gate_bias'], f64['up_bias'], f64['down_bias']),
    product=ref.gpt_oss_glu if c['gpt_oss'] else None,
    capacity_factor=c['capacity'],
    **kw,
  )
  return y, dropped


def ref_tol(dtype, want) -> dict:
  """The tolerance of a routed FFN in ``dtype`` against float64 ``want``."""
  if np.dtype(dtype) == np.float32:
    return F32_FFN
  t = TOL[np.dtype(dtype)]
  # Half precision: the inputs are rounded already (the reference uses the
  # rounded values) but gate/up, the hidden product, each expert's output
  # and the weighted sum each round once more: a few ulps of the largest
  # value, not of each element (sums of signed terms cancel).
  size = max(1.0, float(np.max(np.abs(want), initial=0.0)))
  return dict(rtol=4 * t['rtol'], atol=4 * t['atol'] * size)


def as_f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
