"""Whether a library is intercepting :func:`jax.lax.dot_general` right now.

Qwix (PTQ, QAT and LoRA alike) quantizes a model by patching
``jax.lax.dot_general`` for the duration of the quantized model's call: it
swaps the function's code object (or, for other callables, the module
attribute) and restores it afterwards. The ``MoE`` layers ask this module at
trace time whether the patch is in place; when it is, they run their
experts as ``dot_general`` calls over the stacked expert kernels (the
``'dense'`` impl), which the library can see and quantize, instead of
flaxact's own fused grouped matmul, which it cannot.

Examples:
  >>> from flaxact._src.common.interception import dot_general_intercepted
  >>> dot_general_intercepted()
  False
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax

T = TypeVar('T')

_DOT_GENERAL = jax.lax.dot_general
_DOT_GENERAL_CODE = getattr(_DOT_GENERAL, '__code__', None)


def dot_general_intercepted() -> bool:
  """``True`` while ``jax.lax.dot_general`` is not JAX's own function.

  Compares the attribute now with the one flaxact imported, and its code
  object with the original code object (Qwix patches the code object in
  place, so the function's identity does not change).
  """
  fn = jax.lax.dot_general
  if fn is not _DOT_GENERAL:
    return True
  return getattr(fn, '__code__', None) is not _DOT_GENERAL_CODE


def current_qwix_rule(op_name: str = 'dot_general') -> Any:
  """The Qwix rule for ``op_name`` in the current module, or ``None``.

  ``qwix.pallas.get_current_rule`` (public in Qwix 0.1.8, made for kernels
  that quantize themselves) returns the rule of the provider intercepting
  the call, matched against the module running now (Linen: the module on
  Flax's stack; NNX: the nearest ``self``), and ``None`` outside Qwix. Qwix
  is not imported here unless it already is (then it is intercepting).
  """
  if 'qwix' not in sys.modules or not dot_general_intercepted():
    return None
  import qwix.pallas

  return qwix.pallas.get_current_rule(op_name)


def without_qwix_interception(fn: Callable[..., T]) -> Callable[..., T]:
  """``fn`` run with Qwix's interception off, as Qwix runs its own kernels.

  flaxact's grouped matmul quantizes by itself (the experts' QAT and PTQ
  paths); a Qwix rule matching the ``MoE`` module must not quantize its
  matmuls again. Qwix 0.1.8 runs ``pallas_call`` kernels through its
  ``disable_interceptions``; without that function ``fn`` is returned.
  """
  module = sys.modules.get('qwix._src.interception')
  disable = getattr(module, 'disable_interceptions', None)
  return fn if disable is None else disable(fn)
