"""Sphinx configuration of the flaxact documentation site.

Build from the repository root (``pip install -e '.[docs]'`` first)::

  sphinx-build -W --keep-going -n -b html docs docs/_build/html

The notebooks are pages: the copies that ``tests/test_notebooks.py``
executed (``FLAXACT_QUICK=1``) under ``docs/_build/executed/`` are used when
they match the committed notebooks; otherwise this build executes them
itself, in the same quick setting, and keeps the copies there.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / '_ext'))
sys.path.insert(0, str(ROOT))

import executed_notebooks  # noqa: E402

import flaxact  # noqa: E402

project = 'flaxact'
author = 'flaxact developers'
copyright = '2026, flaxact developers'
release = flaxact.__version__
version = release

extensions = [
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.napoleon',
  'sphinx.ext.mathjax',
  'myst_nb',
  'api_coverage',
  'shared_options',
]

exclude_patterns = ['_build', '_ext', '_templates', 'check_site.py']
templates_path = ['_templates']
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb'}

# Warnings are errors (-W) and every cross-reference must resolve (-n).
nitpicky = True
# No network at build time, so no intersphinx: names of other libraries that
# the docstrings mention (types, jax.lax functions) are not link targets.
nitpick_ignore_regex = [
  (r'py:.*', r'(jax|jnp|flax|nnx|nn|np|numpy|optax|qwix|aqt|torch)(\..*)?'),
  (r'py:.*', r'(collections|typing|functools)\..*'),
  (r'py:class', r'(Array|ArrayLike|Dtype|PrecisionLike|Initializer)'),
]

autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = 'none'
autodoc_member_order = 'bysource'
autodoc_default_options = {'exclude-members': '__init__, __new__'}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False
add_module_names = True

myst_enable_extensions = ['colon_fence', 'dollarmath']
myst_heading_anchors = 3
# The notebooks arrive executed (see executed_notebooks); never run here.
nb_execution_mode = 'off'
nb_merge_streams = True

html_theme = 'sphinx_book_theme'
html_title = f'flaxact {release}'
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
  'show_toc_level': 2,
  'use_download_button': False,
  'use_fullscreen_button': False,
}
suppress_warnings = ['mystnb.unknown_mime_type']

executed_notebooks.prepare(ROOT / 'notebooks', DOCS / 'notebooks')
# autosummary writes a stub page per public name; a stale stub from an
# earlier build would hide a name dropped from docs/api/ from api_coverage.
shutil.rmtree(DOCS / 'api' / '_autosummary', ignore_errors=True)
