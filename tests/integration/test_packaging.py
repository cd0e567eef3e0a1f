"""The built sdist and wheel: complete, installable, working outside the tree.

``python -m build`` makes the sdist and then the wheel *from the sdist*, so a
file missing from either shows up here. The wheel is installed (without
dependencies) into a fresh virtual environment that borrows this
environment's installed dependencies but not its editable flaxact, and one
public function's doctest runs there from a directory outside the source.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from importlib import metadata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
VERSION = metadata.version('flaxact')  # this environment's: pyproject's


def _run(*args, **kwargs) -> str:
  done = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


@pytest.fixture(scope='module')
def dist(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp('dist')
  _run(
    sys.executable,
    '-m',
    'build',
    '--no-isolation',
    '--outdir',
    str(out),
    str(ROOT),
  )
  return out


def _source_files() -> set[str]:
  return {
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / 'flaxact').rglob('*')
    if p.is_file() and '__pycache__' not in p.parts
  }


def test_wheel_holds_every_package_file_and_py_typed(dist):
  (wheel,) = dist.glob(f'flaxact-{VERSION}-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  package = {n for n in names if n.startswith('flaxact/')}
  assert 'flaxact/py.typed' in package
  assert package == _source_files(), sorted(package ^ _source_files())


def test_sdist_holds_the_package_and_its_metadata(dist):
  (sdist,) = dist.glob(f'flaxact-{VERSION}.tar.gz')
  prefix = f'flaxact-{VERSION}/'
  with tarfile.open(sdist) as tar:
    names = {n.removeprefix(prefix) for n in tar.getnames()}
  assert {'pyproject.toml', 'README.md', 'LICENSE', 'PKG-INFO'} <= names
  assert _source_files() <= names, sorted(_source_files() - names)


_CHECK = textwrap.dedent(
  """
  import doctest, pathlib, sys
  from importlib import metadata
  import flaxact, flaxact.linen, flaxact.nnx

  package = pathlib.Path(flaxact.__file__).parent
  assert package.is_relative_to(sys.prefix), package
  assert (package / 'py.typed').is_file()
  assert flaxact.__version__ == metadata.version('flaxact') == sys.argv[1]
  finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(
    optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
  )
  for test in finder.find(flaxact.sigmoid, 'flaxact.sigmoid'):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted > 0 and result.failed == 0, result
  print('ok', package, result)
  """
)


def test_wheel_installs_and_runs_a_doctest_in_a_fresh_venv(dist, tmp_path):
  (wheel,) = dist.glob(f'flaxact-{VERSION}-*.whl')
  venv = tmp_path / 'venv'
  _run(sys.executable, '-m', 'venv', '--without-pip', str(venv))
  python = venv / 'bin' / 'python'
  _run(
    sys.executable,
    '-m',
    'pip',
    '--python',
    str(python),
    'install',
    '--quiet',
    '--no-deps',
    '--no-index',
    str(wheel),
  )
  # Borrow the installed dependencies (jax, flax) through a .pth file: its
  # directories go on sys.path after the new venv's own site-packages, and
  # .pth files inside them (this environment's editable flaxact) are not
  # processed.
  site = _run(
    str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'
  ).strip()
  ours = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}
  (pathlib.Path(site) / 'borrowed_deps.pth').write_text('\n'.join(ours) + '\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = _run(str(python), '-c', _CHECK, VERSION, cwd=tmp_path, env=env)
  assert out.startswith('ok '), out
