"""Checks the built documentation site; exits non-zero on any problem.

Run after ``sphinx-build ... docs docs/_build/html`` (``.ci/run`` does)::

  python docs/check_site.py [docs/_build/html]

It checks that every public name of ``flaxact``, ``flaxact.linen`` and
``flaxact.nnx`` has an anchor (the ``id`` of its API entry), that every page
of every table of contents was built, that each notebook page shows its
plots (images that exist in the build), that the Examples and results page
shows the example scripts' plots, and that no page points readers into
``flaxact._src``.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # this checkout's flaxact
PUBLIC_MODULES = ('flaxact', 'flaxact.linen', 'flaxact.nnx')
#: The plots each notebook draws in its quick setting
#: (``tests/test_notebooks.py`` asserts the same counts).
NOTEBOOK_IMAGES = {'activations': 3, 'glu_variants': 1, 'moe': 3}
#: Page -> the images (file names) it must show: the examples' plots, copied
#: into ``docs/_static/examples/`` from runs of their default commands.
PAGE_IMAGES = {
  'examples': (
    'glu_variants_val_curves.png',
    'gelu_mlp_digits_test_error.png',
    'moe_lm_moe_lm.png',
  ),
}
PRIVATE = re.compile(r'flaxact[./]_src')


def public_names() -> list[str]:
  """``module.name`` for every name in the public modules' ``__all__``."""
  names = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    names += [f'module-{module_name}']  # the anchor of automodule
    names += [f'{module_name}.{n}' for n in module.__all__]
  return names


def toc_pages(docs: pathlib.Path) -> list[str]:
  """Every document named in a ``{toctree}`` of the docs' Markdown pages."""
  pages = []
  for source in sorted(docs.rglob('*.md')):
    if '_build' in source.parts:
      continue
    folder = source.parent.relative_to(docs)
    blocks = re.findall(r'```\{toctree\}\n(.*?)```', source.read_text(), re.S)
    for block in blocks:
      for line in block.splitlines():
        entry = line.strip()
        if entry and not entry.startswith(':'):
          pages.append((folder / entry).as_posix())
  return pages


def anchors(html: pathlib.Path) -> set[str]:
  """Every ``id`` attribute of every built page."""
  found = set()
  for page in html.rglob('*.html'):
    found.update(re.findall(r'\bid="([^"]+)"', page.read_text()))
  return found


def images(page: pathlib.Path) -> list[pathlib.Path]:
  """The files that the ``<img>`` elements of ``page`` show."""
  sources = re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', page.read_text())
  return [
    (page.parent / src).resolve()
    for src in sources
    if not src.startswith(('data:', 'http:', 'https:'))
  ]


def problems(
  html: pathlib.Path,
  docs: pathlib.Path,
  names: list[str],
  notebook_images: dict[str, int],
  page_images: dict[str, tuple[str, ...]] | None = None,
) -> list[str]:
  """Everything wrong with the site built in ``html``; empty when none."""
  if not (html / 'index.html').exists():
    return [f'no site at {html}: build it first']
  found = anchors(html)
  out = [f'public name {n} has no anchor' for n in names if n not in found]
  if not names:
    out.append('no public names to check')
  for page in toc_pages(docs):
    if not (html / f'{page}.html').exists():
      out.append(f'table-of-contents page {page} was not built')
  for name, expected in notebook_images.items():
    page = html / 'notebooks' / f'{name}.html'
    if not page.exists():
      out.append(f'notebook page {name} was not built')
      continue
    shown = [p for p in images(page) if p.is_file()]
    if len(shown) < expected:
      out.append(
        f'notebook page {name} shows {len(shown)} images, expected {expected}'
      )
  for name, expected_files in (page_images or {}).items():
    page = html / f'{name}.html'
    if not page.exists():
      out.append(f'page {name} was not built')
      continue
    shown = {p.name for p in images(page) if p.is_file()}
    for file in expected_files:
      if file not in shown:
        out.append(f'page {name} does not show {file}')
  for page in sorted(html.rglob('*.html')):
    if PRIVATE.search(page.read_text()):
      out.append(f'{page.relative_to(html)} points into flaxact._src')
  return out


def main(argv: list[str]) -> int:
  """Checks the site; prints each problem; returns the exit status."""
  html = pathlib.Path(argv[0]) if argv else DOCS / '_build' / 'html'
  found = problems(html, DOCS, public_names(), NOTEBOOK_IMAGES, PAGE_IMAGES)
  for problem in found:
    print(f'check_site: {problem}', file=sys.stderr)
  if found:
    print(f'check_site: {len(found)} problems in {html}', file=sys.stderr)
    return 1
  print(f'check_site: {html} is complete ({len(public_names())} names)')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
