"""Fails the build when a public name of flaxact has no API page.

Every name in ``flaxact.__all__``, ``flaxact.linen.__all__`` and
``flaxact.nnx.__all__`` must be documented as a Python object of that full
name (``flaxact.nnx.MoE``) by the time the build resolves references; each
missing one is a warning, and the build runs with ``-W``.
"""

from __future__ import annotations

import importlib

from sphinx.util import logging

logger = logging.getLogger(__name__)

PUBLIC_MODULES = ('flaxact', 'flaxact.linen', 'flaxact.nnx')


def public_names() -> list[str]:
  """Full names of every public object: ``module.name`` for each module."""
  names = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    names += [f'{module_name}.{name}' for name in module.__all__]
  return names


def missing(documented) -> list[str]:
  """The public names that are not in ``documented``."""
  return [name for name in public_names() if name not in documented]


def _check(app, env) -> None:
  documented = set(env.get_domain('py').objects)
  for name in missing(documented):
    logger.warning(
      'public name %s has no API page: add it to docs/api/', name,
      type='flaxact', subtype='api_coverage',
    )  # fmt: skip
  for module_name in PUBLIC_MODULES:
    if module_name not in documented:
      logger.warning('module %s has no API page', module_name)


def setup(app):
  """Registers the check."""
  app.connect('env-check-consistency', _check)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
