"""The notebooks as pages: executed once, in their quick setting.

``tests/test_notebooks.py`` executes each notebook of ``notebooks/`` with
``FLAXACT_QUICK=1`` and writes the executed copy to
``docs/_build/executed/NAME.ipynb``, recording the SHA-256 of the committed
notebook in the copy's metadata (``flaxact_docs.source_sha256``). The docs
build calls :func:`prepare`, which puts an executed copy of every notebook
into ``docs/notebooks/`` (ignored by git): the test's copy when its hash
matches the committed notebook, otherwise a fresh execution in the same
quick setting (kept under ``docs/_build/executed/`` for the next build).
So in CI, where the tests run first, no notebook runs twice.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

EXECUTED = (
  pathlib.Path(__file__).resolve().parent.parent / '_build' / 'executed'
)
KEY = 'flaxact_docs'
SHAKESPEARE = (
  pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'data'
  / 'tinyshakespeare.txt'
)  # fmt: skip


def source_sha256(path: pathlib.Path) -> str:
  """The SHA-256 of a committed notebook's bytes."""
  return hashlib.sha256(path.read_bytes()).hexdigest()


def is_current(executed: pathlib.Path, source: pathlib.Path) -> bool:
  """Whether ``executed`` is an execution of ``source`` as committed."""
  import nbformat

  if not executed.exists():
    return False
  nb = nbformat.read(executed, as_version=4)
  recorded = nb.metadata.get(KEY, {}).get('source_sha256')
  return recorded == source_sha256(source)


def quick_env() -> dict[str, str]:
  """The environment of the CI runs: quick mode, tiny Shakespeare if here."""
  env = {'FLAXACT_QUICK': '1'}
  if SHAKESPEARE.exists():
    env['FLAXACT_TEXT'] = str(SHAKESPEARE)
  return env


def execute(source: pathlib.Path, env: dict[str, str]):
  """Executes ``source`` top to bottom in a fresh kernel; returns it."""
  import nbclient
  import nbformat

  nb = nbformat.read(source, as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(
      nb,
      timeout=600,
      kernel_name='python3',
      resources={'metadata': {'path': str(source.parent)}},
    ).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def save(nb, source: pathlib.Path, folder: pathlib.Path = EXECUTED) -> None:
  """Writes the executed ``nb`` of ``source`` where the docs build finds it."""
  import nbformat

  nb.metadata[KEY] = {'source_sha256': source_sha256(source)}
  folder.mkdir(parents=True, exist_ok=True)
  nbformat.write(nb, folder / source.name)


def prepare(notebooks: pathlib.Path, pages: pathlib.Path) -> list[str]:
  """Puts an executed copy of every notebook into ``pages``; returns names."""
  pages.mkdir(parents=True, exist_ok=True)
  names = sorted(p.name for p in notebooks.glob('*.ipynb'))
  for name in names:
    source, executed = notebooks / name, EXECUTED / name
    if not is_current(executed, source):
      print(f'executing {name} (FLAXACT_QUICK=1): no current executed copy')
      save(execute(source, quick_env()), source)
    shutil.copyfile(executed, pages / name)
  return names
