"""The checks of the built documentation site, on a tiny fake site.

``docs/check_site.py`` runs in ``.ci/run`` after the docs build (the tests
run before it, so the real site cannot be checked here); these tests make
sure each of its checks can fail. ``docs/_ext/api_coverage.py`` (the Sphinx
extension that fails the build on an undocumented public name) is tested
the same way.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / 'docs'


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  assert spec and spec.loader
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check_site = _load(DOCS / 'check_site.py')
api_coverage = _load(DOCS / '_ext' / 'api_coverage.py')

NAMES = ['module-flaxact', 'flaxact.gelu', 'flaxact.nnx.MoE']


def _site(
  tmp_path: pathlib.Path, **change
) -> tuple[pathlib.Path, pathlib.Path]:
  """A docs source folder and a complete built site; ``change`` breaks it."""
  docs, html = tmp_path / 'docs', tmp_path / 'html'
  (docs / 'api').mkdir(parents=True)
  (docs / 'index.md').write_text(
    '# x\n\n```{toctree}\n:maxdepth: 1\n\nguide\nnotebooks/nb\napi/index\n```\n'
  )
  (docs / 'api' / 'index.md').write_text('# api\n\n```{toctree}\nref\n```\n')
  pages = {
    'index.html': '<div id="module-flaxact"></div>',
    'guide.html': change.get('guide', '<p>flaxact.gelu</p>'),
    'api/index.html': '<dt id="flaxact.gelu"></dt>',
    'api/ref.html': change.get('ref', '<dt id="flaxact.nnx.MoE"></dt>'),
    'notebooks/nb.html': '<img src="../_images/a.png"><img src="b.png">',
    'results.html': change.get('results', '<img src="_images/plot.png">'),
  }
  for name, text in pages.items():
    if name in change.get('missing', ()):
      continue
    (html / name).parent.mkdir(parents=True, exist_ok=True)
    (html / name).write_text(text)
  (html / '_images').mkdir()
  default_images = ('_images/a.png', 'notebooks/b.png', '_images/plot.png')
  for image in change.get('images', default_images):
    (html / image).write_bytes(b'png')
  return docs, html


def _problems(tmp_path, **change):
  docs, html = _site(tmp_path, **change)
  return check_site.problems(
    html, docs, NAMES, {'nb': 2}, {'results': ('plot.png',)}
  )


def test_a_complete_site_passes(tmp_path):
  assert _problems(tmp_path) == []


def test_toc_pages_are_read_from_every_toctree(tmp_path):
  docs, _ = _site(tmp_path)
  assert check_site.toc_pages(docs) == [
    'api/ref',
    'guide',
    'notebooks/nb',
    'api/index',
  ]


def test_a_public_name_without_an_anchor_fails(tmp_path):
  found = _problems(tmp_path, ref='<dt id="flaxact.nnx.GatedFFN"></dt>')
  assert found == ['public name flaxact.nnx.MoE has no anchor']


def test_a_missing_toc_page_fails(tmp_path):
  found = _problems(tmp_path, missing=('guide.html',))
  assert found == ['table-of-contents page guide was not built']


def test_a_notebook_page_without_its_images_fails(tmp_path):
  images = ('_images/a.png', '_images/plot.png')
  found = _problems(tmp_path, images=images)
  assert found == ['notebook page nb shows 1 images, expected 2']


def test_a_results_page_without_its_plot_fails(tmp_path):
  other = '<img src="_images/other.png">'
  found = _problems(tmp_path / 'other', results=other)
  assert found == ['page results does not show plot.png']
  images = ('_images/a.png', 'notebooks/b.png')  # plot.png not in the build
  found = _problems(tmp_path / 'absent', images=images)
  assert found == ['page results does not show plot.png']


def test_the_examples_page_names_the_plots_the_check_expects():
  source = (DOCS / 'examples.md').read_text()
  for name, files in check_site.PAGE_IMAGES.items():
    assert name in check_site.toc_pages(DOCS)
    for file in files:
      assert f'_static/examples/{file}' in source, file
      assert (DOCS / '_static' / 'examples' / file).is_file(), file


def test_a_page_pointing_into_src_fails(tmp_path):
  found = _problems(tmp_path, guide='see flaxact._src.moe.moe_ffn')
  assert found == ['guide.html points into flaxact._src']


def test_no_site_fails(tmp_path):
  found = check_site.problems(tmp_path / 'none', DOCS, NAMES, {})
  assert found and 'build it first' in found[0]


def test_the_checker_knows_every_public_name():
  import flaxact
  from flaxact import linen, nnx

  names = check_site.public_names()
  for module in (flaxact, linen, nnx):
    assert f'module-{module.__name__}' in names
    for name in module.__all__:
      assert f'{module.__name__}.{name}' in names


def test_api_coverage_reports_an_undocumented_name():
  documented = set(api_coverage.public_names())
  assert api_coverage.missing(documented) == []
  documented.discard('flaxact.linen.MoE')
  assert api_coverage.missing(documented) == ['flaxact.linen.MoE']


@pytest.mark.parametrize('name', sorted(check_site.NOTEBOOK_IMAGES))
def test_every_notebook_is_a_page(name):
  assert (ROOT / 'notebooks' / f'{name}.ipynb').exists()
  toc = check_site.toc_pages(DOCS)
  assert f'notebooks/{name}' in toc


def test_the_examples_manual_holds_no_measured_figures():
  """Results live on docs/examples.md; examples/README.md points there."""
  manual = (ROOT / 'examples' / 'README.md').read_text()
  assert 'docs/examples.md' in manual
  run_times = re.findall(
    r'\b\d+ min \d+ s\b|\b\d+(?:\.\d+)? s measured', manual
  )
  losses = re.findall(r'\b[1-9]\.\d{3,4}\b', manual)  # bpc, as tables print
  assert run_times == [] and losses == [], (run_times, losses)
