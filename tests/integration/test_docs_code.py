"""Every Python code block of the documentation runs in a test.

The pages' blocks (``docs/*.md``) and the README's run here, in page order,
one namespace per page, except the blocks marked ``<!-- recipe: NAME -->``
or ``<!-- moe-recipe: NAME -->``: those recipes are run, and their claims
checked, by the tests named in ``OWNERS``. A marked block on a page that no
owner reads fails here, so no shown code goes untested.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / 'docs'
PAGES = [*sorted(DOCS.glob('*.md')), ROOT / 'README.md']
BLOCK = re.compile(
  r'(?:<!-- ([\w-]+): ([\w-]+) -->\n)?```python\n(.*?)```', flags=re.DOTALL
)
#: ``(marker, page)`` -> the test that runs those recipes.
OWNERS = {
  ('recipe', 'checkpoints.md'): 'tests/test_checkpoints.py',
  ('recipe', 'quantization.md'): 'tests/test_quantization_readme.py',
  ('moe-recipe', 'moe.md'): 'tests/test_moe_readme.py',
}


def blocks(page: pathlib.Path) -> list[tuple[str | None, str]]:
  """``(marker or None, code)`` of each Python block of ``page``."""
  return [
    (kind or None, code) for kind, _, code in BLOCK.findall(page.read_text())
  ]


def _unmarked(page):
  return [code for kind, code in blocks(page) if kind is None]


def test_pages_have_code():
  assert sum(len(blocks(p)) for p in PAGES) >= 20


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_marked_blocks_have_an_owner(page):
  for kind, _ in blocks(page):
    if kind is not None:
      assert (kind, page.name) in OWNERS, (kind, page.name)


# qwix 0.1.8 calls Flax APIs that Flax 0.12 deprecates (moe_quantized.md).
@pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix')
@pytest.mark.parametrize(
  'page', [p for p in PAGES if _unmarked(p)], ids=lambda p: p.name
)
def test_unmarked_blocks_run(page):
  namespace = {'__name__': f'docs_{page.stem}'}
  for i, code in enumerate(_unmarked(page)):
    exec(compile(code, f'{page.name}[block {i}]', 'exec'), namespace)
