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

from typing import Any

import jax
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


def transforms(*arrays: Any) -> frozenset[str]:
  """The transforms (``'batch'``, ``'jvp'``) tracing any leaf of ``arrays``.

  Nested tracers are unwrapped, so ``jax.jvp`` under ``jax.vmap`` reports
  both; ``jax.grad`` (linearize) and ``jax.jit`` report nothing.

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
  found = set()
  for leaf in jax.tree.leaves(arrays):
    seen = 0
    while isinstance(leaf, jax.core.Tracer) and seen < 64:
      seen += 1
      for name, kind in TRACERS.items():
        if isinstance(leaf, kind):
          found.add(name)
      leaf = next((getattr(leaf, a) for a in _INNER if hasattr(leaf, a)), None)
  return frozenset(found)
