"""The experts impls of a routed FFN: their names and how ``'auto'`` picks.

The one table of ``impl`` names: the grouped-matmul impls of
:mod:`flaxact._src.moe.experts.grouped` (``'loop'``, ``'ragged'``,
``'tiles'``), ``'dense'`` (:mod:`flaxact._src.moe.experts.dense`) and
``'auto'``, which :func:`resolve_impl` turns into one of them at trace time.

Examples:
  >>> from flaxact._src.moe.experts import api
  >>> api.IMPLS
  ('loop', 'ragged', 'tiles', 'dense', 'auto')
  >>> api.resolve_impl('auto', hooked=True)
  'dense'
"""

from __future__ import annotations

import typing
import warnings
from typing import Any, Literal

import jax

from flaxact._src.common.checks import normalise_choice
from flaxact._src.common.interception import dot_general_intercepted
from flaxact._src.common.tracing import transforms

#: A grouped-matmul impl (rows sorted by expert).
GroupedImpl = Literal['loop', 'ragged', 'tiles']
#: Every value of an ``impl`` argument.
Impl = Literal['loop', 'ragged', 'tiles', 'dense', 'auto']

#: The grouped-matmul impls.
GROUPED_IMPLS: tuple[str, ...] = typing.get_args(GroupedImpl)
#: Every ``impl`` value: the grouped impls, ``'dense'`` and ``'auto'``.
IMPLS: tuple[str, ...] = typing.get_args(Impl)

#: Default rows per tile of the ``'loop'`` and ``'tiles'`` impls.
DEFAULT_TILE = 128


class GroupedImplUnderQuantizerWarning(UserWarning):
  """A grouped experts impl ran where a quantizer intercepts matmuls."""


def check_impl(impl: str) -> str:
  """The normalised impl name.

  Raises:
    ValueError: for an unknown impl; the message lists the valid ones.
  """
  return normalise_choice(impl, IMPLS, 'impl', 'impls')


def resolve_impl(impl: str, *, hooked: bool = False) -> str:
  """The experts impl that ``impl`` means here, at trace time.

  ``'auto'`` is ``'dense'`` when the experts' matmuls must be visible to a
  quantizer: ``hooked`` (a ``dot_general`` hook is set) or
  ``jax.lax.dot_general`` intercepted (Qwix); otherwise ``'loop'`` on CPU
  and ``'ragged'`` on GPU and TPU.

  Args:
    impl: ``'auto'``, ``'loop'``, ``'tiles'``, ``'ragged'`` or ``'dense'``.
    hooked: whether a ``dot_general`` hook is set.

  Raises:
    ValueError: for an unknown impl, or a grouped impl with ``hooked``.

  Warns:
    GroupedImplUnderQuantizerWarning: a grouped impl given explicitly while
      ``jax.lax.dot_general`` is intercepted.
  """
  impl = check_impl(impl)
  if impl == 'auto':
    if hooked or dot_general_intercepted():
      return 'dense'
    return 'loop' if jax.default_backend() == 'cpu' else 'ragged'
  if hooked and impl != 'dense':
    raise ValueError(
      f"impl={impl!r} runs the experts in flaxact's grouped matmul, which a"
      " dot_general hook cannot reach; use impl='auto' or 'dense' with"
      ' dot_general/dot_general_cls.'
    )
  if impl != 'dense' and dot_general_intercepted():
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
  batching rule for an unbatched kernel). The results are the same.

  Args:
    impl: a resolved impl.
    *arrays: the inputs of the routed FFN (pytrees; ``None`` is fine).
  """
  if impl not in GROUPED_IMPLS:
    return impl, True
  found = transforms(*arrays)
  if 'jvp' in found:
    return 'tiles', False
  if 'batch' in found and impl == 'ragged':
    return 'tiles', True
  return impl, True
