"""CI runs of the notebooks, at the small size ``FLAXACT_QUICK=1`` selects.

Each notebook is executed top to bottom in a fresh kernel with nbclient; any
cell that raises fails the test. The committed notebooks must carry no
outputs.
"""

import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
SHAKESPEARE = os.path.join(
  os.path.dirname(ROOT), 'shared', 'data', 'tinyshakespeare.txt'
)
NAMES = ['activations.ipynb', 'glu_variants.ipynb']


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


@pytest.mark.parametrize('name', NAMES)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, name
  assert 'google.colab' in nb.cells[1].source  # the Colab install cell


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
  assert images_in(nb) == 1
