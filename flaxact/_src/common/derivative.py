"""Element-wise functions with a hand-written derivative.

:func:`with_derivative` builds a ``jax.custom_jvp`` function from a value
kernel and a derivative kernel. The derivative is evaluated on
``optimization_barrier(x)``, a copy of ``x`` that XLA cannot common up with
the value's own sub-expressions. Without it, XLA merges the transcendental
sub-expressions the value and the derivative share (``exp``, ``erfc``,
``tanh``), finds the result has two users, and writes it to memory as a
separate array that both outputs then read back. With it, the value and the
derivative are each computed in one pass over ``x``: the recomputation is
cheaper than the memory traffic on CPU, GPU and TPU alike (measured on CPU:
exact GELU forward+backward 2.8x -> 1.9x relu's time in float32, 13.8x ->
5.4x in bfloat16).

:func:`with_output_derivative` is for functions whose derivative is a cheap
function of their value (``sigmoid' = y (1 - y)``), as ``jax.nn`` computes
them: the backward pass then reads the value and does a few multiplications,
with no second transcendental pass over ``x``. Use it only where the
derivative formed from the rounded value is accurate enough (for sigmoid its
absolute error stays below 4e-8 in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

Array = jax.Array


def with_derivative(
  value: Callable[[Array], Array], derivative: Callable[[Array], Array]
) -> Callable[[Array], Array]:
  """Returns ``value`` as a ``custom_jvp`` function whose derivative is given.

  Args:
    value: the element-wise function, ``x -> f(x)``.
    derivative: its derivative, ``x -> f'(x)``, itself differentiable so
      that higher derivatives work.

  Returns:
    A function equal to ``value`` whose JVP is ``derivative(x) * t``.
  """
  fn = jax.custom_jvp(value)

  def jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    slope = derivative(copy_behind_barrier(x))
    return value(x), slope * t

  fn.defjvp(jvp)
  return fn


def with_output_derivative(
  value: Callable[[Array], Array], derivative: Callable[[Array], Array]
) -> Callable[[Array], Array]:
  """Returns ``value`` as a ``custom_jvp`` function with ``f' = g(f(x))``.

  Args:
    value: the element-wise function, ``x -> y = f(x)``.
    derivative: its derivative written in terms of the value, ``y -> f'(x)``.
      Higher derivatives follow by the chain rule through ``value``.

  Returns:
    A function equal to ``value`` whose JVP is ``derivative(y) * t``.
  """
  fn = jax.custom_jvp(value)
  fn.defjvps(lambda t, y, x: derivative(y) * t)
  return fn


def copy_behind_barrier(x: Array) -> Array:
  """Returns ``x`` behind an optimisation barrier (see the module docstring).

  What is computed from the result is computed afresh, never shared with
  (and so never materialised for) what is computed from ``x`` itself.
  """
  return jax.lax.optimization_barrier(x)
