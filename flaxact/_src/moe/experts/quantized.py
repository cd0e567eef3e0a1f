"""Quantized expert kernels for the grouped impls: int8 values and scales.

A Qwix PTQ model (``qwix.quantize_model`` with a ``qwix.PtqProvider`` and a
``weight_qtype`` rule; ``qwix`` 0.1.8) stores each stacked expert kernel
``(E, in, out)`` as a ``WithAux`` holding a ``QArray``: ``qvalue`` int8
``(E, in, out)`` and ``scale`` ``(E, 1, out)`` (one scale per expert and
output channel: Qwix's ``dot_general`` treats every non-contracting axis of
the ``'dense'`` formulation's kernel as a channel), symmetric (no zero
point). :func:`from_qwix` turns it into a :class:`QuantizedKernel`, which the
grouped impls (:mod:`flaxact._src.moe.experts.grouped`) accept wherever a
float kernel goes: each expert's (or tile's) kernel is dequantized when a
matmul reads it, ``values[e] * scale[e]`` in the compute dtype, as Qwix's own
``dot_general`` dequantizes the whole kernel; the stored weights stay int8.

Examples:
  >>> import jax.numpy as jnp
  >>> from flaxact._src.moe.experts.quantized import QuantizedKernel
  >>> q = QuantizedKernel(
  ...     jnp.ones((4, 8, 16), jnp.int8), jnp.full((4, 1, 16), 0.5),
  ...     jnp.float32)
  >>> q.shape, q[jnp.array([0, 3])].shape, float(q.expert(1)[0, 0])
  ((4, 8, 16), (2, 8, 16), 0.5)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('values', 'scale'),
  meta_fields=('dtype',),
)
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
  """A stacked expert kernel as integer values and per-channel scales.

  Attributes:
    values: ``(E, in, out)`` integer values (int8).
    scale: ``(E, 1, out)`` one scale per expert and output channel.
    dtype: the compute dtype the kernel dequantizes to.
  """

  values: Array
  scale: Array
  dtype: Any

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the kernel, ``(E, in, out)``."""
    return tuple(self.values.shape)

  def _dq(self, values: Array, scale: Array) -> Array:
    return (values.astype(self.dtype) * scale.astype(self.dtype)).astype(
      self.dtype
    )

  def dequantize(self) -> Array:
    """The whole ``(E, in, out)`` kernel in the compute dtype."""
    return self._dq(self.values, self.scale)

  def expert(self, e: Array) -> Array:
    """Expert ``e``'s ``(in, out)`` kernel (``e`` a traced scalar)."""
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)
    return self._dq(pick(self.values), pick(self.scale))

  def __getitem__(self, idx: Array) -> Array:
    """The kernels of the experts ``idx``, gathered int8 then dequantized."""
    return self._dq(self.values[idx], self.scale[idx])

  def zero_cotangent(self) -> QuantizedKernel:
    """The cotangent of a quantized kernel: none (``float0`` values)."""
    values = np.zeros(self.values.shape, jax.dtypes.float0)
    return QuantizedKernel(values, jnp.zeros_like(self.scale), self.dtype)  # type: ignore[arg-type]


def expert_weight(w: Any, e: Array) -> Array:
  """Expert ``e``'s kernel of ``w``, float or :class:`QuantizedKernel`."""
  if isinstance(w, QuantizedKernel):
    return w.expert(e)
  return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)


def dense_weight(w: Any) -> Array:
  """``w`` as a float array (a :class:`QuantizedKernel` dequantized)."""
  return w.dequantize() if isinstance(w, QuantizedKernel) else w


def is_quantized(kernel: Any) -> bool:
  """Whether ``kernel`` is a Qwix quantized array (or a QuantizedKernel)."""
  if isinstance(kernel, QuantizedKernel):
    return True
  inner = getattr(kernel, 'array', kernel)  # Qwix PTQ's WithAux
  return hasattr(inner, 'qvalue') and hasattr(inner, 'scale')


def from_qwix(kernel: Any, name: str, dtype: Any) -> QuantizedKernel:
  """A Qwix ``QArray`` (or PTQ ``WithAux``) expert kernel as int8 + scales.

  Args:
    kernel: ``WithAux(QArray)`` or ``QArray`` with ``qvalue`` ``(E, in,
      out)`` and ``scale`` ``(E, 1, out)``.
    name: the projection, for messages (``'gate_proj'``, ...).
    dtype: the compute dtype.

  Raises:
    ValueError: for a scale of another shape (per-tensor, per-expert only,
      sub-channel tiles), a zero point (asymmetric quantization) or values
      that are not ``(E, in, out)``.
  """
  if isinstance(kernel, QuantizedKernel):
    return dataclasses.replace(kernel, dtype=dtype)
  q = getattr(kernel, 'array', kernel)
  values, scale = jnp.asarray(q.qvalue), jnp.asarray(q.scale)
  if values.ndim != 3:
    raise ValueError(
      f'MoE: the quantized {name} kernel must have shape (E, in, out); got'
      f' {tuple(values.shape)}.'
    )
  if not jnp.issubdtype(values.dtype, jnp.integer):
    raise ValueError(
      f'MoE: the quantized {name} kernel must hold integer values (int8);'
      f' got {values.dtype}.'
    )
  e, _, out = values.shape
  if tuple(scale.shape) != (e, 1, out):
    raise ValueError(
      f'MoE: the quantized {name} kernel of shape {tuple(values.shape)} needs'
      f' one scale per expert and output channel, shape {(e, 1, out)}; got'
      f' scale shape {tuple(scale.shape)}. The grouped impls serve'
      " per-channel weight quantization only; use impl='dense' for others."
    )
  if getattr(q, 'zero_point', None) is not None:
    raise ValueError(
      f'MoE: the quantized {name} kernel has a zero point (asymmetric'
      ' quantization); the grouped impls take symmetric kernels only (zero'
      " point None); use impl='dense'."
    )
  return QuantizedKernel(values, scale, dtype)
