"""Which JAX transformations are tracing an array, for impl fallbacks.

Some of flaxact's fastest kernels are not closed under every transform:
``lax.ragged_dot`` has no batching rule for an unbatched kernel, and a
``jax.custom_vjp`` function has no JVP. :func:`transforms` names the
transforms tracing a set of arrays so that the routed FFN can run an
equivalent, transformable impl under them instead of raising.

The tracer types are read from JAX's interpreters (``JVPTracer`` from
``jax.interpreters.ad``; ``BatchTracer`` from ``jax._src``); a test pins
that they still exist.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
from jax import core as jax_core
from jax._src.interpreters import batching as _batching
from jax.interpreters import ad as _ad

#: The tracer types recognised, by the name :func:`transforms` reports.
TRACERS: dict[str, type] = {
  'batch': _batching.BatchTracer,
  'jvp': _ad.JVPTracer,
}
# The attribute holding the wrapped value of each tracer type (primal for
# differentiation tracers, the batched value for vmap's).
_INNER = ('primal', 'val')
# Transforms seen outside a tracing boundary (remat, jit) that hides them.
_OUTER: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
  'flaxact_outer_transforms', default=frozenset()
)


def transforms(*arrays: Any) -> frozenset[str]:
  """The transforms (``'batch'``, ``'jvp'``) tracing any leaf of ``arrays``.

  Nested tracers are unwrapped, so ``jax.jvp`` under ``jax.vmap`` reports
  both; ``jax.grad`` (linearize) and ``jax.jit`` report nothing. A
  ``jax.jit`` or ``jax.checkpoint`` boundary hides the transforms outside
  it; a layer reports them across its own remat with :func:`seen`.

  Args:
    *arrays: pytrees of arrays (``None`` leaves are skipped).

  Returns:
    The names of the transforms found.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> jax.vmap(lambda x: print(sorted(transforms(x))) or x)(jnp.ones(2))
    ['batch']
    Array([1., 1.], dtype=float32)
  """
  found = set(_OUTER.get())
  for leaf in jax.tree.leaves(arrays):
    seen = 0
    while isinstance(leaf, jax_core.Tracer) and seen < 64:
      seen += 1
      for name, kind in TRACERS.items():
        if isinstance(leaf, kind):
          found.add(name)
      leaf = next((getattr(leaf, a) for a in _INNER if hasattr(leaf, a)), None)
  return frozenset(found)


@contextlib.contextmanager
def seen(*arrays: Any) -> Iterator[None]:
  """Within the block, :func:`transforms` also reports those of ``arrays``.

  A layer wraps its remat'd body in it, so the routed FFN inside learns
  the transforms its input and parameters are traced by.
  """
  token = _OUTER.set(transforms(*arrays))
  try:
    yield
  finally:
    _OUTER.reset(token)
