"""Helpers shared by the FFN layer tests: residuals and checkpoint names."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.extend
from jax.ad_checkpoint import print_saved_residuals


def saved_residuals(f, *args) -> list[str]:
  """The lines of ``jax.ad_checkpoint.print_saved_residuals(f, *args)``."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  return buf.getvalue().splitlines()


def residuals_of_shape(f, args, shape) -> list[str]:
  """The saved residuals of ``f(*args)`` whose shape is ``shape``."""
  prefix = '[' + ','.join(str(d) for d in shape) + ']'
  return [r for r in saved_residuals(f, *args) if prefix in r.split(' ')[0]]


def checkpoint_names(jaxpr) -> set[str]:
  """Every checkpoint name in a jaxpr, sub-jaxprs included."""
  names = {e.params['name'] for e in jaxpr.eqns if e.primitive.name == 'name'}
  for sub in jax.extend.core.subjaxprs(jaxpr):
    names |= checkpoint_names(sub)
  return names
