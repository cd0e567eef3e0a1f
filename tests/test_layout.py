"""The package layout's import rules, checked over the AST of ``flaxact/``.

The folders of ``flaxact/_src`` form layers: ``common`` at the bottom, then
``activations``, then ``moe`` (functional routed FFNs), then ``layers`` (the
framework-free body shared by Linen and NNX), then ``linen`` and ``nnx``;
``interop/torch`` reads PyTorch state dicts without flax or torch. A module
may import from its own folder and from the folders its rule allows.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flaxact

SRC = pathlib.Path(flaxact.__file__).parent / '_src'
FOLDERS = ('common', 'activations', 'moe', 'layers', 'linen', 'nnx', 'interop')

# For each folder: the other flaxact folders it may import, and the external
# top-level packages (or dotted prefixes) it must not import.
ALLOWED = {
  'common': set(),
  'activations': {'common'},
  'moe': {'common', 'activations'},
  'layers': {'common', 'activations', 'moe'},
  'linen': {'common', 'activations', 'moe', 'layers', 'interop'},
  'nnx': {'common', 'activations', 'moe', 'layers', 'interop'},
  'interop': {'common', 'activations', 'moe'},
}
FORBIDDEN = {
  'common': ('flax',),
  'activations': ('flax',),
  'moe': ('flax',),
  'layers': ('flax.linen', 'flax.nnx'),
  'interop': ('flax', 'torch'),
}


def _modules():
  return sorted(p for p in SRC.rglob('*.py'))


def _folder(path: pathlib.Path) -> str:
  return path.relative_to(SRC).parts[0]


def _imports(path: pathlib.Path):
  """``(module, names, lineno)`` for every import in ``path``."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, (), node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module, tuple(a.name for a in node.names), node.lineno


def test_every_module_is_in_a_folder():
  loose = [p.name for p in SRC.glob('*.py') if p.name != '__init__.py']
  assert loose == []
  assert {p.name for p in SRC.iterdir() if p.is_dir()} >= set(FOLDERS)


@pytest.mark.parametrize(
  'path', _modules(), ids=lambda p: str(p.relative_to(SRC))
)
def test_import_rules(path):
  folder = _folder(path)
  if folder == '__init__.py':
    return
  bad = []
  for module, names, line in _imports(path):
    targets = [module]
    if module == 'flaxact._src':
      targets = [f'flaxact._src.{n}' for n in names]
    for target in targets:
      if target.startswith('flaxact._src.'):
        other = target.split('.')[2]
        if other != folder and other not in ALLOWED[folder]:
          bad.append(f'line {line}: {target} ({folder} may not import {other})')
      elif target.startswith('flaxact'):
        bad.append(f'line {line}: {target} (public modules only re-export)')
      for prefix in FORBIDDEN.get(folder, ()):
        if target == prefix or target.startswith(prefix + '.'):
          bad.append(f'line {line}: {target} ({folder} may not import it)')
  assert bad == []


@pytest.mark.parametrize(
  'path', _modules(), ids=lambda p: str(p.relative_to(SRC))
)
def test_no_private_name_of_another_module(path):
  """``from flaxact._src.x import _y`` and ``module._y`` reach in: neither."""
  tree = ast.parse(path.read_text())
  imported_modules = set()
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
      'flaxact'
    ):
      for alias in node.names:
        if alias.name.startswith('_'):
          bad.append(f'line {node.lineno}: imports {alias.name}')
        imported_modules.add(alias.asname or alias.name)
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in imported_modules
      and node.attr.startswith('_')
      and not node.attr.startswith('__')
    ):
      bad.append(f'line {node.lineno}: {node.value.id}.{node.attr}')
  assert bad == []


def test_import_flaxact_does_not_import_flax():
  code = (
    'import sys, flaxact\n'
    "bad = sorted(m for m in sys.modules if m == 'flax' or"
    " m.startswith('flax.'))\n"
    'assert not bad, bad[:5]\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_private_flax_attributes_read_by_flaxact_still_mean_the_same():
  """Flax internals that flaxact reads, pinned so a Flax change fails here.

  NNX remat reads ``Variable._can_update`` (``nnx/base.py``): ``True`` where
  the variable can be written, ``False`` inside a ``jax.jit`` trace that
  closes over it. NNX ``MoE`` records its aux values only inside
  ``nnx.capture``, which it detects by the ``__captures__`` attribute
  (``nnx/moe.py``). If Flax renames or changes either, this fails instead
  of a layer silently taking the wrong branch.
  """
  param = nnx.Param(jnp.zeros(3))
  seen = []

  @jax.jit
  def closed_over(x):
    seen.append(param._can_update)
    return x

  closed_over(1.0)
  assert param._can_update is True
  assert seen == [False]

  class Probe(nnx.Module):
    def __call__(self):
      return hasattr(self, '__captures__')

  probe = Probe()
  assert probe() is False
  assert nnx.capture(probe, nnx.Intermediate)()[0] is True
  uses = [
    str(p.relative_to(SRC))
    for p in _modules()
    if '_can_update' in p.read_text() or '__captures__' in p.read_text()
  ]
  assert uses == ['nnx/base.py', 'nnx/moe.py']
