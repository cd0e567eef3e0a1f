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

import jax

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
