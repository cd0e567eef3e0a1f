"""Shared test helpers: the dtype-keyed tolerance table and float64 helpers.

Every tolerance in the suite comes from :data:`TOL`; a test that needs
another value says why at the call site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from scipy import special

import flaxact

# Starting from JAX's own test tolerances (jax._src.public_test_util).
TOL = {
  # forward value, relative (atol/rtol for assert_trees_all_close)
  np.dtype(jnp.float32): dict(rtol=1e-6, atol=1e-6),
  np.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2),
  np.dtype(jnp.float16): dict(rtol=1e-3, atol=1e-3),
  np.dtype(jnp.float64): dict(rtol=1e-12, atol=1e-12),
}
# finite-difference gradient checks (jax.test_util.check_grads)
GRAD_TOL = {
  np.dtype(jnp.float32): dict(atol=2e-3, rtol=2e-3),
  np.dtype(jnp.float64): dict(atol=1e-5, rtol=1e-5),
}
# float32 accuracy goals of the activations against a float64 reference
F32_RTOL_MAIN = 2e-6  # wherever |y| >= 1e-6
F32_RTOL_TAIL = 2e-5  # wherever 1e-30 <= |y| < 1e-6

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def tol(dtype) -> dict:
  """The forward tolerance for ``dtype``."""
  return TOL[np.dtype(dtype)]


# --------------------------------------------------------------------------
# float64 references and the registry of cases that drives the generic suites
# --------------------------------------------------------------------------
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _x_times(x, s):
  """``x * s`` with the limit 0 where ``x = -inf`` and ``s = 0``."""
  with np.errstate(all='ignore'):
    out = x * s
  return np.where(np.isinf(x) & (s == 0), 0.0, out)


def _gelu_tanh_ref(x):
  with np.errstate(all='ignore'):
    u2 = 2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    return _x_times(x, special.expit(u2))


def _mish_ref(x):
  with np.errstate(all='ignore'):
    return _x_times(x, np.tanh(np.logaddexp(0.0, x)))


def _hard_sigmoid_ref(x):
  return np.clip(x / 6 + 0.5, 0.0, 1.0)


def _elu_ref(x, alpha=1.0):
  with np.errstate(all='ignore'):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


@dataclasses.dataclass(frozen=True)
class Case:
  """One element-wise activation and everything the generic suite needs.

  Attributes:
    fn: the flaxact function, called as ``fn(x)``.
    ref: float64 numpy reference, accurate in the tails.
    kinks: ``{x: exact derivative}`` at non-differentiable points (the
      documented convention, which is PyTorch's).
    grad_at_inf: the derivative at ``(-inf, +inf)`` (``inf`` where it is
      unbounded).
    smooth_order: how many times ``check_grads`` may differentiate at the
      smooth points.
  """

  fn: Callable
  ref: Callable
  kinks: dict = dataclasses.field(default_factory=dict)
  grad_at_inf: tuple = (0.0, 1.0)
  smooth_order: int = 2


# Adding an activation to the suite is one line here.
CASES: dict[str, Case] = {
  'relu': Case(flaxact.relu, lambda x: np.maximum(x, 0.0), {0.0: 0.0}),
  'relu6': Case(
    flaxact.relu6,
    lambda x: np.clip(x, 0.0, 6.0),
    {0.0: 0.0, 6.0: 0.0},
    (0.0, 0.0),
  ),
  'leaky_relu': Case(
    flaxact.leaky_relu,
    lambda x: np.where(x > 0, x, 0.01 * x),
    {0.0: 0.01},
    (0.01, 1.0),
  ),
  'relu_squared': Case(
    flaxact.relu_squared,
    lambda x: np.maximum(x, 0.0) ** 2,
    {0.0: 0.0},
    (0.0, np.inf),
  ),
  'hard_sigmoid': Case(
    flaxact.hard_sigmoid,
    _hard_sigmoid_ref,
    {-3.0: 0.0, 3.0: 0.0},
    (0.0, 0.0),
  ),
  'hard_silu': Case(
    flaxact.hard_silu,
    lambda x: _x_times(x, _hard_sigmoid_ref(x)),
    {-3.0: -0.5, 3.0: 1.5},
  ),
  'identity': Case(flaxact.identity, lambda x: x, {}, (1.0, 1.0)),
  'elu': Case(flaxact.elu, _elu_ref, {0.0: 1.0}),
  'selu': Case(
    flaxact.selu,
    lambda x: SELU_SCALE * _elu_ref(x, SELU_ALPHA),
    {0.0: SELU_SCALE * SELU_ALPHA},
    (0.0, SELU_SCALE),
  ),
  'celu': Case(flaxact.celu, _elu_ref, {0.0: 1.0}),
  'sigmoid': Case(flaxact.sigmoid, special.expit, {}, (0.0, 0.0)),
  'tanh': Case(flaxact.tanh, np.tanh, {}, (0.0, 0.0)),
  'softplus': Case(flaxact.softplus, lambda x: np.logaddexp(0.0, x)),
  'silu': Case(flaxact.silu, lambda x: _x_times(x, special.expit(x))),
  'swish': Case(flaxact.swish, lambda x: _x_times(x, special.expit(x))),
  'quick_gelu': Case(
    flaxact.quick_gelu, lambda x: _x_times(x, special.expit(1.702 * x))
  ),
  'mish': Case(flaxact.mish, _mish_ref),
  'gelu': Case(
    flaxact.gelu,
    lambda x: _x_times(x, 0.5 * special.erfc(-x / np.sqrt(2))),
  ),
  'gelu_tanh': Case(flaxact.gelu_tanh, _gelu_tanh_ref),
  'gelu_10': Case(
    flaxact.gelu_10,
    lambda x: np.clip(CASES['gelu'].ref(x), -10.0, 10.0),
    {10.0: 1.0},  # gelu'(10) = 1 + 7.7e-22: torch.clamp passes it at 10
    (0.0, 0.0),
  ),
  'sqrt_softplus': Case(
    flaxact.sqrt_softplus,
    lambda x: np.sqrt(np.logaddexp(0.0, x)),
    {},
    (0.0, 0.0),
  ),
  'laplace': Case(
    flaxact.laplace,
    lambda x: 0.5 * special.erfc((0.707107 - x) / (0.282095 * np.sqrt(2))),
    {},
    (0.0, 0.0),
  ),
}


def _glu_ref(act):
  def ref(x, axis=-1):
    a, b = np.split(np.asarray(x, np.float64), 2, axis=axis)
    return a * act(b)

  return ref


# Split-form gated functions and their float64 references.
GATED_CASES: dict[str, tuple[Callable, Callable]] = {
  'glu': (flaxact.glu, _glu_ref(special.expit)),
  'reglu': (flaxact.reglu, _glu_ref(lambda b: np.maximum(b, 0.0))),
  'geglu': (flaxact.geglu, _glu_ref(CASES['gelu'].ref)),
  'geglu_tanh': (flaxact.geglu_tanh, _glu_ref(_gelu_tanh_ref)),
  'swiglu': (flaxact.swiglu, _glu_ref(CASES['silu'].ref)),
  'bilinear': (flaxact.bilinear, _glu_ref(lambda b: b)),
}


def ordered_bits(a: np.ndarray) -> np.ndarray:
  """Maps 16-bit floats to integers whose differences count ULPs."""
  i = a.view(np.int16).astype(np.int32)
  return np.where(i >= 0, i, -32768 - i)


def all_finite_values(dtype) -> np.ndarray:
  """Every finite value of a 16-bit float dtype (about 63k of them)."""
  bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
  values = bits.view(np.dtype(dtype))
  with np.errstate(all='ignore'):  # NaN bit patterns
    finite = np.isfinite(values.astype(np.float64))
  return values[finite]
