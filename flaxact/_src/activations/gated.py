"""Gated linear units: the split form and the two-array gated product.

Split-form functions take one pre-projected array ``x`` of shape ``(..., 2 *
d)``, split it into halves ``(a, b)`` along ``axis`` and return ``a * act(b)``:
**value first, gate second**, the order of ``jax.nn.glu`` and
``torch.nn.functional.glu``. The two-array form, :func:`gated_product`, computes
``act(gate) * up`` for the separate projections that the FFN layers use (LLaMA's
``act(gate_proj(x)) * up_proj(x)``), lives in
:mod:`flaxact._src.activations.gated_product`, which resolves activation names
through the registry (the registry imports this module, so this module never
imports the registry).

Both have a hand-written derivative that keeps two hidden-sized residuals,
``act'(gate) * up`` and ``act(gate)``, where plain autodiff of
``jax.nn.silu(gate) * up`` keeps five.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flaxact._src.activations.gelu import gelu_kernel, gelu_tanh_kernel
from flaxact._src.activations.piecewise import relu_kernel
from flaxact._src.activations.sigmoid import sigmoid_kernel
from flaxact._src.activations.swish import silu_kernel
from flaxact._src.common.checks import (
  as_float_array,
  compute_dtype,
  split_halves,
)

Array = jax.Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gated(act: Callable[[Array], Array], gate: Array, up: Array) -> Array:
  return act(gate) * up


@_gated.defjvp
def _gated_jvp(act, primals, tangents):
  gate, up = primals
  t_gate, t_up = tangents
  a, da = jax.jvp(act, (gate,), (jnp.ones_like(gate),))
  return a * up, (da * up) * t_gate + a * t_up


def _linear(x: Array) -> Array:
  return x


def apply_gated(act: Callable[[Array], Array], gate: Array, up: Array) -> Array:
  """``act(gate) * up`` in the compute dtype, with the two-residual derivative.

  The core of :func:`flaxact.gated_product` and the split-form functions:
  half-precision inputs are computed in float32 and rounded once.
  """
  dtype = gate.dtype
  ctype = compute_dtype(dtype)
  return _gated(act, gate.astype(ctype), up.astype(ctype)).astype(dtype)


def _split_gated(act, x: Any, axis: int) -> Array:
  x = as_float_array(x)
  value, gate = split_halves(x, axis)
  return apply_gated(act, gate, value)


def glu(x: ArrayLike, axis: int = -1) -> Array:
  r"""Gated linear unit, split form: ``a * sigmoid(b)``.

  .. math::
    \mathrm{glu}([a, b]) = a \odot \sigma(b)

  Args:
    x: array of shape ``(..., 2 * d, ...)``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array of shape ``(..., d, ...)`` and the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.glu(jnp.array([[2.0, 0.0]]))
    Array([[1.]], dtype=float32)

  References:
    Dauphin et al., "Language Modeling with Gated Convolutional Networks",
    ICML 2017. https://arxiv.org/abs/1612.08083
  """
  return _split_gated(sigmoid_kernel, x, axis)


def reglu(x: ArrayLike, axis: int = -1) -> Array:
  r"""ReGLU, split form: ``a * relu(b)``.

  .. math::
    \mathrm{reglu}([a, b]) = a \odot \max(b, 0)

  Args:
    x: array of shape ``(..., 2 * d)`` along ``axis``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array with ``axis`` halved, in the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.reglu(jnp.array([3.0, 5.0, 2.0, -1.0]))
    Array([6., 0.], dtype=float32)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202
  """
  return _split_gated(relu_kernel, x, axis)


def geglu(x: ArrayLike, axis: int = -1) -> Array:
  r"""GeGLU with the exact GELU, split form: ``a * gelu(b)``.

  .. math::
    \mathrm{geglu}([a, b]) = a \odot b\,\Phi(b)

  Args:
    x: array of shape ``(..., 2 * d)`` along ``axis``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array with ``axis`` halved, in the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.geglu(jnp.zeros((4, 6))).shape
    (4, 3)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202

  See also:
    :func:`geglu_tanh` for the tanh-GELU variant used by T5.1.1 and Gemma.
  """
  return _split_gated(gelu_kernel, x, axis)


def geglu_tanh(x: ArrayLike, axis: int = -1) -> Array:
  r"""GeGLU with the tanh-approximate GELU: ``a * gelu_tanh(b)``.

  The variant of T5.1.1 (``"gated-gelu"``) and Gemma.

  Args:
    x: array of shape ``(..., 2 * d)`` along ``axis``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array with ``axis`` halved, in the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.geglu_tanh(jnp.zeros((6, 4)), axis=0).shape
    (3, 4)
  """
  return _split_gated(gelu_tanh_kernel, x, axis)


def swiglu(x: ArrayLike, axis: int = -1) -> Array:
  r"""SwiGLU, split form: ``a * silu(b)`` (LLaMA, PaLM, Mistral).

  .. math::
    \mathrm{swiglu}([a, b]) = a \odot b\,\sigma(b)

  Args:
    x: array of shape ``(..., 2 * d)`` along ``axis``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array with ``axis`` halved, in the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.swiglu(jnp.ones((2, 8), jnp.bfloat16)).dtype
    dtype(bfloat16)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202
  """
  return _split_gated(silu_kernel, x, axis)


def bilinear(x: ArrayLike, axis: int = -1) -> Array:
  r"""Bilinear GLU, split form: ``a * b`` (no non-linearity on the gate).

  .. math::
    \mathrm{bilinear}([a, b]) = a \odot b

  Args:
    x: array of shape ``(..., 2 * d)`` along ``axis``, floating dtype.
    axis: the axis to split; its size must be even.

  Returns:
    An array with ``axis`` halved, in the dtype of ``x``.

  Raises:
    ValueError: if the size of ``axis`` is odd or ``axis`` is out of range.

  Examples:
    >>> import jax.numpy as jnp, flaxact
    >>> flaxact.bilinear(jnp.array([2.0, 3.0]))
    Array([6.], dtype=float32)

  References:
    Shazeer, "GLU Variants Improve Transformer", 2020.
    https://arxiv.org/abs/2002.05202
  """
  return _split_gated(_linear, x, axis)
