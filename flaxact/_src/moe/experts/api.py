"""The experts impls of a routed FFN: their names and how ``'auto'`` picks.

The one table of ``impl`` names: the grouped-matmul impls of
:mod:`flaxact._src.moe.experts.grouped` (``'loop'``, ``'ragged'``,
``'tiles'``, ``'tokamax'``), ``'dense'``
(:mod:`flaxact._src.moe.experts.dense`) and ``'auto'``, which
:func:`resolve_impl` turns into one of them at trace time.

Examples:
  >>> from flaxact._src.moe.experts import api
  >>> api.IMPLS
  ('loop', 'ragged', 'tiles', 'tokamax', 'dense', 'auto')
  >>> api.resolve_impl('auto', hooked=True)
  'dense'
"""

from __future__ import annotations

import importlib.util
import sys
import typing
import warnings
from typing import Any, Literal

import jax

from flaxact._src.common.checks import normalise_choice
from flaxact._src.common.interception import dot_general_intercepted
from flaxact._src.common.tracing import transforms
from flaxact._src.moe.experts.grouped import RAGGED_IMPLS

#: A grouped-matmul impl (rows sorted by expert).
GroupedImpl = Literal['loop', 'ragged', 'tiles', 'tokamax']
#: Every value of an ``impl`` argument.
Impl = Literal['loop', 'ragged', 'tiles', 'tokamax', 'dense', 'auto']

#: The grouped-matmul impls.
GROUPED_IMPLS: tuple[str, ...] = typing.get_args(GroupedImpl)
#: Every ``impl`` value: the grouped impls, ``'dense'`` and ``'auto'``.
IMPLS: tuple[str, ...] = typing.get_args(Impl)

#: Rows per tile of ``'tiles'`` when ``tile_size`` is not given.
DEFAULT_TILE = 128
#: The range of the rows per tile ``'loop'`` picks (:func:`tile_rows`).
LOOP_TILES = (64, 512)


def tile_rows(
  tile_size: int | None, impl: str, assignments: int, num_experts: int
) -> int:
  """Rows per tile of a grouped impl's layout.

  ``1`` for the ragged impls (unpadded rows); ``tile_size`` where given;
  else, for ``'loop'``, the largest power of two at most half the mean rows
  per expert (``assignments / num_experts / 2``), kept within
  :data:`LOOP_TILES`: large tiles for large matmuls, while each expert's
  last, partial tile runs in smaller blocks (half a tile, a quarter, ...)
  (measured in ``benchmarks/moe.py``: 256 rows on the fine shape, 512 on
  the coarse one); for ``'tiles'`` :data:`DEFAULT_TILE` (its padding is
  memory).

  >>> tile_rows(None, 'loop', 4096 * 8, 64), tile_rows(None, 'loop', 8192, 8)
  (256, 512)
  >>> tile_rows(None, 'tiles', 8192, 8), tile_rows(32, 'loop', 8192, 8)
  (128, 32)
  """
  if impl in RAGGED_IMPLS:
    return 1
  if tile_size is not None:
    return int(tile_size)
  if impl != 'loop':
    return DEFAULT_TILE
  low, high = LOOP_TILES
  half = assignments / max(num_experts, 1) / 2
  tile = low
  while tile * 2 <= min(half, high):
    tile *= 2
  return tile


class GroupedImplUnderQuantizerWarning(UserWarning):
  """A grouped experts impl ran where a quantizer intercepts matmuls."""


def tokamax_available() -> bool:
  """Whether the optional ``tokamax`` package can be imported."""
  if 'tokamax' in sys.modules:  # imported, or blocked with None
    return sys.modules['tokamax'] is not None
  return importlib.util.find_spec('tokamax') is not None


def require_tokamax() -> None:
  """Raises ``ImportError`` naming ``pip install tokamax`` without it."""
  if not tokamax_available():
    raise ImportError(
      "MoE: impl='tokamax' runs the experts through tokamax.ragged_dot, but"
      ' tokamax is not installed; `pip install tokamax` (or flaxact[tokamax]),'
      " or use impl='auto', 'ragged', 'loop' or 'tiles'."
    )


def check_impl(impl: str) -> str:
  """The normalised impl name.

  Raises:
    ValueError: for an unknown impl; the message lists the valid ones.
  """
  return normalise_choice(impl, IMPLS, 'impl', 'impls')


def check_explicit_impl(impl: str, *, hooked: bool) -> None:
  """Checks an explicit (not ``'auto'``) impl against its environment.

  Raises:
    ValueError: a grouped impl with ``hooked``.
    ImportError: ``'tokamax'`` without the ``tokamax`` package.
  """
  if impl == 'tokamax':
    require_tokamax()
  if hooked and impl != 'dense':
    raise ValueError(
      f"impl={impl!r} runs the experts in flaxact's grouped matmul, which a"
      " dot_general hook cannot reach; use impl='auto' or 'dense' with"
      ' dot_general/dot_general_cls.'
    )


def resolve_impl(
  impl: str, *, hooked: bool = False, quantized: bool = False
) -> str:
  """The experts impl that ``impl`` means here, at trace time.

  ``'auto'``:

  - ``'dense'`` when the experts' matmuls must be visible to a quantizer:
    ``hooked`` (a ``dot_general`` hook is set) or ``jax.lax.dot_general``
    intercepted (Qwix) while the kernels are still float (QAT, or the
    calibrating call of ``qwix.quantize_model`` that creates PTQ weights);
  - with ``quantized`` kernels (Qwix PTQ int8 values and per-expert,
    per-channel scales, no hook) the grouped impl this backend would pick
    for float kernels: nothing is left for the quantizer to do, and the
    grouped impls dequantize one expert's (or tile's) kernel at a time;
  - ``'loop'`` on CPU: XLA's CPU ``ragged_dot`` is one masked dense matmul
    per expert (``E`` times the FLOPs), the tile loop is the fastest
    (``benchmarks/moe.py``);
  - on GPU and TPU ``'tokamax'`` when the ``tokamax`` package is installed,
    else ``'ragged'``. The evidence: ``jax.lax.ragged_dot`` lowers to
    XLA's ragged-dot expander, which on recent NVIDIA GPUs materialises the
    dense ``(rows, E)`` problem (marin issue #7012 measured 22.6 TFLOP/s
    for it against about 1,470 TFLOP/s for a grouped-GEMM kernel on the same
    shapes), while ``tokamax.ragged_dot`` dispatches to Pallas grouped-GEMM
    kernels (Mosaic GPU / Triton on GPU, Mosaic on TPU) and falls back to
    XLA where none applies. ``benchmarks/moe.py --impls all`` prints the
    measured recommendation for the device it runs on.

  Args:
    impl: ``'auto'``, ``'loop'``, ``'tiles'``, ``'ragged'``, ``'tokamax'``
      or ``'dense'``.
    hooked: whether a ``dot_general`` hook is set.
    quantized: whether the expert kernels are quantized arrays.

  Raises:
    ValueError: for an unknown impl, or a grouped impl with ``hooked``.
    ImportError: ``'tokamax'`` without the ``tokamax`` package (the message
      names ``pip install tokamax``).

  Warns:
    GroupedImplUnderQuantizerWarning: a grouped impl given explicitly while
      ``jax.lax.dot_general`` is intercepted and the kernels are float.
  """
  impl = check_impl(impl)
  if impl == 'auto':
    if hooked or (dot_general_intercepted() and not quantized):
      return 'dense'
    if jax.default_backend() == 'cpu':
      return 'loop'
    return 'tokamax' if tokamax_available() else 'ragged'
  check_explicit_impl(impl, hooked=hooked)
  if impl != 'dense' and not quantized and dot_general_intercepted():
    warnings.warn(
      f'MoE: impl={impl!r} while jax.lax.dot_general is intercepted (Qwix):'
      " the experts' grouped matmul is not a quantization point, so their"
      ' kernels stay float (and a QAT rule matching the MoE module itself'
      ' fake-quantizes the grouped forward only). Use the default'
      " impl='auto' (or 'dense') to quantize the experts; filter this"
      ' warning if only the router or shared expert is meant.',
      GroupedImplUnderQuantizerWarning,
      stacklevel=2,
    )
  return impl


def transform_impl(impl: str, *arrays: Any) -> tuple[str, bool]:
  """The grouped impl to run under the transforms tracing ``arrays``.

  Returns ``(impl, lean)``; ``lean`` is whether the experts may run under
  their ``custom_vjp`` (the memory-lean backward). Under forward-mode
  autodiff (``jax.jvp``, ``jax.jacfwd``; a ``custom_vjp`` has no JVP) every
  grouped impl runs as ``'tiles'`` differentiated by plain autodiff, and
  under ``vmap`` ``'ragged'`` runs as ``'tiles'`` (``lax.ragged_dot`` has no
  batching rule for an unbatched kernel; ``'tokamax'`` likewise). The
  results are the same.

  Args:
    impl: a resolved impl.
    *arrays: the inputs of the routed FFN (pytrees; ``None`` is fine).
  """
  if impl not in GROUPED_IMPLS:
    return impl, True
  found = transforms(*arrays)
  if 'jvp' in found:
    return 'tiles', False
  if 'batch' in found and impl in ('ragged', 'tokamax'):
    return 'tiles', True
  return impl, True
