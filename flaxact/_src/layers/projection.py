"""The framework-free part of a projection: matmul, bias and dtype rules.

Linen's and NNX's ``Projection`` modules hold the parameters and call
``promote_dtype`` from their own framework (the function Flax's ``Dense`` and
``Linear`` call, and the one Qwix intercepts to pass quantized weights
through); then both call :func:`project` on the promoted arrays, so the two
APIs run the same operations in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

Array = jax.Array
#: A class (or factory) whose instances are ``dot_general`` functions: one
#: instance is made per projection, as ``nn.Dense(dot_general_cls=...)``.
DotGeneralCls = Callable[[], DotGeneralT]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectionOptions:
  """The options a layer passes to each of its projections.

  One set for Linen and NNX: a layer builds it from its own options and
  every projection it creates (dense, stacked expert, router, shared
  expert) reads it.

  Attributes:
    use_bias: whether to add a bias.
    param_dtype: the dtype of the parameters.
    precision: matmul precision.
    kernel_init: kernel initialiser (for a fused kernel it is applied per
      half, with the unfused shape; for stacked experts per expert).
    bias_init: bias initialiser.
    dot_general: a :func:`jax.lax.dot_general` replacement or ``None``.
    dot_general_cls: a class whose instance replaces ``dot_general``, one
      instance per projection.
  """

  use_bias: bool
  param_dtype: Dtype
  precision: PrecisionLike
  kernel_init: Initializer
  bias_init: Initializer
  dot_general: DotGeneralT | None = None
  dot_general_cls: DotGeneralCls | None = None

  @property
  def hooked(self) -> bool:
    """Whether a ``dot_general``/``dot_general_cls`` hook is set."""
    return self.dot_general is not None or self.dot_general_cls is not None

  def make_dot_general(self) -> DotGeneralT | None:
    """A projection's own ``dot_general`` (a new ``dot_general_cls()``).

    Without ``dot_general_cls``, ``dot_general`` itself.
    """
    if self.dot_general_cls is not None:
      return self.dot_general_cls()
    return self.dot_general


def layer_dtype(x: Array, dtype: Dtype | None) -> np.dtype:
  """The layer's compute dtype: ``dtype`` if given, else the input's.

  Examples:
    >>> import jax.numpy as jnp
    >>> layer_dtype(jnp.ones(2, jnp.bfloat16), None).name
    'bfloat16'
    >>> layer_dtype(jnp.ones(2, jnp.bfloat16), jnp.float32).name
    'float32'
  """
  return np.dtype(x.dtype if dtype is None else dtype)


def hidden_projection_dtype(
  dtype: Dtype, activations_in_float32: bool
) -> np.dtype | None:
  """The matmul output dtype of the hidden-sized projections.

  ``gate_proj``/``up_proj`` return float32 when ``activations_in_float32`` is
  set and ``dtype`` is half precision, so the pre-activations, the
  activation, the product and dropout run in float32 and the hidden
  activation is rounded once, when it is cast to ``dtype`` for
  ``down_proj``. Otherwise ``None``: the projection's own dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> hidden_projection_dtype(jnp.bfloat16, True)
    dtype('float32')
    >>> hidden_projection_dtype(jnp.float32, True) is None
    True
  """
  if activations_in_float32 and np.dtype(dtype).itemsize < 4:
    return np.dtype(jnp.float32)
  return None


def project(
  x: Array,
  kernel: Any,
  bias: Any,
  *,
  precision: PrecisionLike = None,
  dot_general: DotGeneralT | None = None,
  preferred_element_type: Dtype | None = None,
) -> Array:
  """``x @ kernel + bias`` over the last axis of ``x``.

  ``x``, ``kernel`` and ``bias`` come already promoted to the compute dtype
  (a quantization library may hand a quantized ``kernel`` through).

  Args:
    x: input, shape ``(..., in)``.
    kernel: shape ``(in, *out)``: ``(in, out)`` or the fused ``(in, 2, out)``.
    bias: shape ``out`` (``(out,)`` or ``(2, out)``) or ``None``.
    precision: passed to ``dot_general``.
    dot_general: a function with :func:`jax.lax.dot_general`'s signature;
      ``None`` looks up ``jax.lax.dot_general`` at call time (so libraries
      that intercept it, such as Qwix, see the call).
    preferred_element_type: the accumulation and output dtype of the
      matmul. Passed to ``dot_general`` when given, and the result is cast to
      it afterwards when a hook ignored it.

  Returns:
    An array of shape ``(..., *out)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> project(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones(4)).shape
    (2, 4)
  """
  dot = jax.lax.dot_general if dot_general is None else dot_general
  kwargs = {}
  if preferred_element_type is not None:
    kwargs['preferred_element_type'] = preferred_element_type
  y = dot(
    x,
    kernel,
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=precision,
    **kwargs,
  )
  if preferred_element_type is not None and y.dtype != preferred_element_type:
    y = y.astype(preferred_element_type)
  if bias is not None:
    bias = jnp.asarray(bias).astype(y.dtype)
    y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def fused_kernel_init(
  init: Callable[..., Array],
) -> Callable[..., Array]:
  """Initialises a fused ``(embed, 2, mlp)`` kernel as two ``(embed, mlp)``.

  Each half is drawn by ``init`` with its own key and the shape of an
  unfused kernel, so variance-scaling initialisers see the same fans as for
  separate ``gate_proj`` and ``up_proj`` kernels.
  """

  def init_fused(key: Array, shape: Sequence[int], dtype: Any = jnp.float32):
    embed, two, mlp = shape
    if two != 2:
      raise ValueError(
        f'fused kernel shape must be (embed, 2, mlp); got {tuple(shape)}.'
      )
    k_gate, k_up = jax.random.split(key)
    return jnp.stack(
      [init(k_gate, (embed, mlp), dtype), init(k_up, (embed, mlp), dtype)],
      axis=1,
    )

  return init_fused


def split_fused(y: Array) -> tuple[Array, Array]:
  """Splits a fused projection ``(..., 2, mlp)`` into ``(gate, up)``."""
  return y[..., 0, :], y[..., 1, :]
