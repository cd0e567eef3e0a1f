"""CI runs of the notebooks, at the small size ``FLAXACT_QUICK=1`` selects.

Each notebook is executed top to bottom in a fresh kernel with nbclient; any
cell that raises fails the test. The committed notebooks must carry no
outputs. Each executed copy is kept under ``docs/_build/executed/`` (ignored
by git) for the docs build, which shows the notebooks as pages without
executing them a second time (``docs/_ext/executed_notebooks.py``).
"""

import glob
import importlib.util
import os
import subprocess
import sys
import types

import pytest

# Skipping is for machines without the test extras; CI must run these.
_CI = os.environ.get('CI') == 'true'
try:
  import nbclient
  import nbformat
except ImportError as e:
  if _CI:
    raise ImportError(f'CI needs the notebook test extras: {e}') from e
  pytest.skip(f'notebook tests need nbformat and nbclient: {e}', True)

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
SHAKESPEARE = os.path.join(
  os.path.dirname(ROOT), 'shared', 'data', 'tinyshakespeare.txt'
)
NAMES = ['activations.ipynb', 'glu_variants.ipynb', 'moe.ipynb']
EXECUTED_NOTEBOOKS = os.path.join(ROOT, 'docs', '_ext', 'executed_notebooks.py')


def keep_for_docs(nb, name):
  """Writes the executed ``nb`` where the docs build looks for it."""
  spec = importlib.util.spec_from_file_location(
    'executed_notebooks', EXECUTED_NOTEBOOKS
  )
  assert spec and spec.loader
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.save(nb, module.pathlib.Path(NOTEBOOKS) / name)


def execute(name, env):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(
      nb,
      timeout=600,
      kernel_name='python3',
      resources={'metadata': {'path': NOTEBOOKS}},
    )
    client.execute()
    keep_for_docs(nb, name)
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def stdout_of(nb) -> str:
  return ''.join(
    o.get('text', '')
    for cell in nb.cells
    for o in cell.get('outputs', [])
    if o.get('name') == 'stdout'
  )


def images_in(nb) -> int:
  return sum(
    'image/png' in o.get('data', {})
    for cell in nb.cells
    for o in cell.get('outputs', [])
  )


def install_cell(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  cells = [c for c in nb.cells if 'google.colab' in c.source]
  assert len(cells) == 1 and cells[0].cell_type == 'code', name
  return nb, cells[0].source


@pytest.mark.parametrize('name', NAMES)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.parametrize('name', NAMES)
def test_colab_install_cell(name, tmp_path, monkeypatch):
  nb, source = install_cell(name)
  # The notebook says plainly what to do in each case.
  text = ''.join(c.source for c in nb.cells if c.cell_type == 'markdown')
  for phrase in ('not on PyPI', 'from a clone', 'with a wheel', 'pip wheel'):
    assert phrase in text, phrase
  calls = []
  monkeypatch.setattr(subprocess, 'run', lambda cmd, **kw: calls.append(cmd))
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('colab'))
  monkeypatch.setenv('FLAXACT_TEXT', 'any.txt')  # no download
  monkeypatch.chdir(tmp_path)
  # flaxact importable (a clone installed with pip -e): nothing to do.
  exec(source, {})
  assert calls == []
  # Not installed, no wheel, no source: a message that says what to do.
  monkeypatch.setitem(sys.modules, 'flaxact', None)
  with pytest.raises(RuntimeError, match=r'not on PyPI.*wheel.*FLAXACT_SOURCE'):
    exec(source, {})
  # An uploaded wheel: the newest one is installed.
  for version in ('0.1.0', '0.2.0'):
    (tmp_path / f'flaxact-{version}-py3-none-any.whl').write_bytes(b'')
  exec(source, {})
  assert calls[-1][:4] == [sys.executable, '-m', 'pip', 'install']
  assert 'flaxact-0.2.0-py3-none-any.whl' in calls[-1]
  # A clone's folder (or a git URL) in FLAXACT_SOURCE wins over wheels.
  exec(source.replace("FLAXACT_SOURCE = ''", "FLAXACT_SOURCE = '/c/fx'"), {})
  assert '/c/fx' in calls[-1]
  assert glob.glob('*.whl')  # the cell leaves uploaded files alone


def test_activations_notebook_runs():
  nb = execute('activations.ipynb', {'FLAXACT_QUICK': '1'})
  out = stdout_of(nb)
  assert 'split-form gated functions' in out
  assert 'max |gelu_tanh - exact|' in out
  assert images_in(nb) == 3


def test_glu_variants_notebook_runs():
  env = {'FLAXACT_QUICK': '1'}
  if os.path.exists(SHAKESPEARE):
    env['FLAXACT_TEXT'] = SHAKESPEARE
  elif _CI:
    pytest.fail(f'tiny Shakespeare not found at {SHAKESPEARE}; CI needs it')
  nb = execute('glu_variants.ipynb', env)
  out = stdout_of(nb)
  for variant in (
    'ReLU',
    'GELU',
    'Swish',
    'GLU',
    'Bilinear',
    'ReGLU',
    'GeGLU',
    'SwiGLU',
  ):
    assert f'| {variant} |' in out, out
  assert 'whole validation split' in out
  assert images_in(nb) == 1


def test_moe_notebook_runs():
  import importlib.util
  import re

  env = {'FLAXACT_QUICK': '1'}
  if os.path.exists(SHAKESPEARE):
    env['FLAXACT_TEXT'] = SHAKESPEARE
  elif _CI:
    pytest.fail(f'tiny Shakespeare not found at {SHAKESPEARE}; CI needs it')
  nb = execute('moe.ipynb', env)
  out = stdout_of(nb)
  assert 'tokens per expert' in out and 'recorded by the layer' in out
  for arm in ('dense', 'MoE softmax', 'MoE sigmoid'):
    assert f'| {arm} |' in out, out
  # The transformers comparison runs where torch and transformers are
  # installed (not required by the suite) and is skipped cleanly elsewhere.
  if all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
    err = re.search(r'max \|flaxact - transformers\| .* = (\S+)', out)
    assert err and float(err.group(1)) < 1e-5, out
  else:
    assert 'skipped: torch and transformers are needed' in out, out
  assert images_in(nb) == 3
