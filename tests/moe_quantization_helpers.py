"""The MoE a user writes by hand, as the baseline of the MoE quantization tests.

:class:`NnxMoE` and :class:`LinenMoE` are what a user writes to make a
mixture of experts quantizable: the router an ``nnx.Linear`` /
``nn.Dense(dtype=float32)`` on the unflattened input, softmax top-k
renormalised, and each expert projection ONE ``jax.lax.dot_general`` whose
rhs is the whole stacked ``(E, in, out)`` kernel, inside a module named
``gate_proj`` / ``up_proj`` / ``down_proj`` that holds that kernel (so
Qwix attributes the matmul to the module and finds its ``kernel``):

* gate/up: the tokens broadcast to ``(T, E, d)``, times ``(E, d, h)`` with
  the experts as the batch axis: ``(E, T, h)`` (so LoRA gets one adapter
  per expert, as PEFT gives each expert ``Linear`` its own);
* down: the hidden activations back to ``(T, E, h)``, times
  ``(E, h, out)``: ``(E, T, out)``, then summed over ``E``.

Every token goes through every expert; the routing weights form a ``(T, E)``
combine matrix built without a matmul (a quantizer must not round them) and
scale the hidden activations before ``down_proj``. Optional pieces follow
the flaxact layer's order: GPT-OSS biases (router bias, per-expert biases,
the down bias scaled by the routing weight) and a shared expert added as
``y + sigmoid(x @ gate) * shared(x)`` (Qwen2-MoE). Parameter names match
``flaxact``'s ``MoE``, so one params tree (Linen) or one state (NNX) fits
both.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxact
from flaxact._src.moe.routing_step import GroupedImplUnderQuantizerWarning
from tests import quantization_helpers as qh

#: Input width, expert hidden width, experts, experts per token, shared
#: expert hidden width.
D, H, E, K, SHARED_H = 16, 32, 4, 2, 24

#: The marks both MoE quantization test modules take.
PYTESTMARK = [
  # qwix 0.1.8 calls Flax APIs that Flax 0.12 deprecates; flaxact uses
  # neither.
  pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix'),
  pytest.mark.filterwarnings(
    "ignore:'.value' setter is now deprecated:DeprecationWarning"
  ),
  # aqtp 0.9.0 calls jnp.promote_types on arrays (inside its dot_general).
  pytest.mark.filterwarnings(
    'ignore:Implicit conversion of an array to a dtype:DeprecationWarning'
  ),
]


@functools.cache
def x_input():
  """The input both test modules use, ``(2, 6, D)``."""
  return jax.random.normal(jax.random.key(1), (2, 6, D))


#: The layer variants: keyword arguments of both frameworks' ``MoE``.
VARIANTS = {
  'base': {},
  'shared': dict(shared_hidden_features=SHARED_H, shared_expert_gate=True),
  'biases': dict(use_bias=True, router_use_bias=True),
}

_DIMS = (((2,), (1,)), ((1,), (0,)))  # (T, E, i) x (E, i, o) -> (E, T, o)


def combine_matrix(logits: jax.Array, k: int) -> jax.Array:
  """``(T, E)`` renormalised softmax top-``k`` weights, zero elsewhere."""
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  weights = weights / weights.sum(-1, keepdims=True)
  one_hot = jax.nn.one_hot(experts, logits.shape[-1], dtype=weights.dtype)
  return (one_hot * weights[..., None]).sum(1)


def project(x, kernel, bias, combine, dot_general):
  """Every expert's projection of ``x`` with one ``dot_general``."""
  dot = jax.lax.dot_general if dot_general is None else dot_general
  y = dot(x, kernel, _DIMS, None)  # (E, T, out)
  if bias is None:
    return y
  if combine is None:  # gate/up
    return y + bias[:, None, :]
  return y + combine.T[..., None] * bias[:, None, :]  # down


def experts_ffn(tokens, combine, gate, up, down):
  """``sum_e combine[t, e] * down_e(silu(gate_e(x)) * up_e(x))``."""
  rows = jnp.broadcast_to(tokens[:, None], (*combine.shape, tokens.shape[-1]))
  hidden = flaxact.silu(gate(rows)) * up(rows) * combine.T[..., None]
  return down(jnp.swapaxes(hidden, 0, 1), combine).sum(0)


def random_params(tree, seed=0):
  """Random values for a params tree (arrays or ``ShapeDtypeStruct``s).

  Kernels ``(..., fan_in, out)`` are ``N(0, 1 / fan_in)``; biases are
  ``N(0, 0.1**2)``, not the layers' zeros, so the bias paths count.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = []
  for (path, leaf), key in zip(leaves, keys, strict=True):
    z = jax.random.normal(key, leaf.shape, leaf.dtype)
    bias = getattr(path[-1], 'key', None) == 'bias'
    values.append(z * (0.1 if bias else leaf.shape[-2] ** -0.5))
  return jax.tree_util.tree_unflatten(treedef, values)


# ---------------------------------------------------------------- NNX


def without_out_sharding(dot_general):
  """``dot_general`` as ``nnx.Linear`` calls it, ``out_sharding=`` dropped.

  ``nnx.Linear`` passes ``out_sharding`` to its ``dot_general``; AQT's
  functional config (``aqt_config.config_v4(...)``) takes no such argument,
  so a user handing it to ``nnx.Linear`` wraps it like this.
  """

  def call(lhs, rhs, dims, precision=None, out_sharding=None, **kw):
    del out_sharding  # None here: no sharding in these tests
    return dot_general(lhs, rhs, dims, precision, **kw)

  return call


class NnxExperts(nnx.Module):
  """``E`` stacked kernels ``(E, in, out)`` (biases ``(E, out)``)."""

  def __init__(self, n_in, n_out, *, use_bias, dot_general, rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (E, n_in, n_out)))
    self.bias = nnx.Param(jnp.zeros((E, n_out))) if use_bias else nnx.data(None)
    self.dot_general = dot_general

  def __call__(self, x, combine=None):
    bias = None if self.bias is None else self.bias[...]
    return project(x, self.kernel[...], bias, combine, self.dot_general)


class NnxMoE(nnx.Module):
  """The NNX MoE a user writes by hand (see the module docstring)."""

  def __init__(
    self,
    *,
    use_bias=False,
    router_use_bias=False,
    shared_hidden_features=None,
    shared_expert_gate=False,
    dot_general=None,
    rngs,
  ):
    hook: dict[str, Any] = {}
    if dot_general is not None:
      hook['dot_general'] = without_out_sharding(dot_general)
    self.router = nnx.Linear(
      D, E, use_bias=router_use_bias, dtype=jnp.float32, rngs=rngs, **hook
    )

    def experts(n_in, n_out):
      return NnxExperts(
        n_in, n_out, use_bias=use_bias, dot_general=dot_general, rngs=rngs
      )

    self.gate_proj, self.up_proj = experts(D, H), experts(D, H)
    self.down_proj = experts(H, D)
    self.shared_expert = nnx.data(None)
    self.shared_expert_gate = nnx.data(None)
    if shared_hidden_features is not None:
      self.shared_expert = qh.NnxHand(
        D,
        shared_hidden_features,
        gated=True,
        act='silu',
        use_bias=False,
        rngs=rngs,
      )
      if shared_expert_gate:
        self.shared_expert_gate = nnx.Linear(
          D, 1, use_bias=False, rngs=rngs, **hook
        )

  def __call__(self, x):
    lead = x.shape[:-1]
    combine = combine_matrix(self.router(x).reshape(-1, E), K)
    tokens = x.reshape(-1, D)
    y = experts_ffn(
      tokens, combine, self.gate_proj, self.up_proj, self.down_proj
    ).reshape(*lead, -1)
    if self.shared_expert is not None:
      shared = self.shared_expert(x)
      if self.shared_expert_gate is not None:
        shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * shared
      y = y + shared
    return y


def nnx_hand_like(layer, **variant):
  """An :class:`NnxMoE` holding the parameters of ``layer`` (a flaxact MoE).

  Args:
    layer: a ``flaxact.nnx.MoE``.
    **variant: the :class:`NnxMoE` options matching ``layer``'s.

  Raises:
    ValueError: if the two do not have the same parameter paths and shapes.
  """
  # Built abstract (no initialisers run), then given ``layer``'s values.
  hand = nnx.eval_shape(lambda: NnxMoE(**variant, rngs=nnx.Rngs(9)))
  copy_state(layer, hand, nnx.Param)
  return hand


def copy_state(src, dst, kind):
  """Copies ``src``'s variables of type ``kind`` into ``dst`` (same paths)."""
  shapes = [
    jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m, kind)))
    for m in (src, dst)
  ]
  if shapes[0] != shapes[1]:
    raise ValueError(f'different {kind.__name__} trees: {shapes}')
  nnx.update(dst, nnx.state(src, kind))


# ---------------------------------------------------------------- Linen


class LinenExperts(nn.Module):
  """``E`` stacked kernels ``(E, in, out)`` (biases ``(E, out)``)."""

  n_in: int
  n_out: int
  use_bias: bool = False
  dot_general: Any = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x, combine=None):
    init = nn.initializers.lecun_normal()
    kernel = self.param('kernel', init, (E, self.n_in, self.n_out))
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (E, self.n_out))
    dot = self.dot_general
    if self.dot_general_cls is not None:
      dot = self.dot_general_cls()  # one instance here, as nn.Dense
    return project(x, kernel, bias, combine, dot)


class LinenMoE(nn.Module):
  """The Linen MoE a user writes by hand (see the module docstring)."""

  use_bias: bool = False
  router_use_bias: bool = False
  shared_hidden_features: int | None = None
  shared_expert_gate: bool = False
  dot_general: Any = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x):
    hook: dict[str, Any] = {'dot_general_cls': self.dot_general_cls}
    if self.dot_general is not None:
      hook['dot_general'] = self.dot_general
    lead = x.shape[:-1]
    logits = nn.Dense(
      E,
      use_bias=self.router_use_bias,
      dtype=jnp.float32,
      name='router',
      **hook,
    )(x)
    combine = combine_matrix(logits.reshape(-1, E), K)
    gate, up, down = (
      LinenExperts(
        n_in,
        n_out,
        use_bias=self.use_bias,
        dot_general=self.dot_general,
        dot_general_cls=self.dot_general_cls,
        name=name,
      )
      for name, n_in, n_out in (
        ('gate_proj', D, H),
        ('up_proj', D, H),
        ('down_proj', H, D),
      )
    )
    tokens = x.reshape(-1, D)
    y = experts_ffn(tokens, combine, gate, up, down).reshape(*lead, -1)
    if self.shared_hidden_features is not None:
      shared = qh.LinenHand(
        self.shared_hidden_features,
        dot_general_cls=self.dot_general_cls,
        name='shared_expert',
      )(x)
      if self.shared_expert_gate:
        gate_logit = nn.Dense(
          1, use_bias=False, name='shared_expert_gate', **hook
        )(x)
        shared = jax.nn.sigmoid(gate_logit) * shared
      y = y + shared
    return y


@contextlib.contextmanager
def warns_grouped():
  """Expects :class:`GroupedImplUnderQuantizerWarning` (others recorded).

  Records every warning (Qwix's deprecation warnings too) instead of
  ``pytest.warns``, which re-raises the ones that do not match.
  """
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter('always')
    yield
  found = [w for w in seen if w.category is GroupedImplUnderQuantizerWarning]
  assert found and "impl='loop'" in str(found[0].message), seen


def assert_qat_within_rounding(y, y_dense, y_float, grads, grads_dense):
  """The grouped QAT path against Qwix's ``'dense'`` one (same weights).

  Both quantize the same values the same way, but the gate/up outputs of
  the grouped matmul and of Qwix's int8 matmul can differ in the last bit,
  which can move a hidden value across an int8 rounding boundary before
  ``down_proj``: a fraction of the quantization error, not rounding-level.
  """
  assert qh.float_error(y, y_dense) <= 0.3 * qh.float_error(y_dense, y_float)
  num = sum(
    float(jnp.sum((a - b) ** 2))
    for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(grads_dense), strict=True
    )
  )
  den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(grads_dense))
  assert (num / den) ** 0.5 <= 0.15, (num / den) ** 0.5
