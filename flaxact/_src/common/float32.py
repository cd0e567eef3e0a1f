"""Error-free float32 arithmetic for accurate activation tails.

A float32 constant ``c`` is carried as :class:`SplitConstant`: its float32
value, that value split into a 12-significant-bit ``hi`` and the remaining
``mid`` (so ``hi * x`` is exact for a 12-bit ``x``), and the ``rest`` of the
exact constant that float32 cannot hold. :func:`product_error` is Dekker's
exact rounding error of ``float32(x * c)``; with ``rest`` it gives the
first-order correction that the GELU and Laplace tails apply.

Examples:
  >>> import math, jax.numpy as jnp, numpy as np
  >>> c = split_constant(1 / math.sqrt(2))
  >>> float(c.hi) + float(c.mid) == float(c.value)
  True
  >>> x = jnp.float32(3.0)
  >>> err = product_error(x, c)
  >>> abs(float(np.float64(3.0) * float(c.value) - (x * c.value)) - float(err))
  0.0
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

Array = jax.Array

# Veltkamp's splitter for float32: 2**12 + 1.
_SPLITTER = np.float32(4097.0)


class SplitConstant(NamedTuple):
  """A real constant as float32 ``value = hi + mid`` plus the ``rest``."""

  value: np.float32
  hi: np.float32
  mid: np.float32
  rest: np.float32


def split_constant(v: float) -> SplitConstant:
  """``v`` as a :class:`SplitConstant` (``hi`` keeps 12 significant bits)."""
  f = np.float32(v)
  bits = np.frombuffer(f.tobytes(), np.uint32) & np.uint32(0xFFFFF000)
  hi = np.frombuffer(bits.tobytes(), np.float32)[0]
  return SplitConstant(f, hi, np.float32(f - hi), np.float32(v - float(f)))


def product_error(x: Array, c: SplitConstant) -> Array:
  """The exact rounding error of ``float32(x * c.value)`` (Dekker's product).

  ``x * c.value + product_error(x, c)`` equals the real product exactly for
  float32 ``x`` whose products do not overflow or underflow.
  """
  t = x * _SPLITTER
  x_hi = t - (t - x)
  x_lo = x - x_hi
  p = x * c.value
  return ((x_hi * c.hi - p) + x_hi * c.mid + x_lo * c.hi) + x_lo * c.mid
