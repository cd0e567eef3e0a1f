"""Runs the docs' "Mixture of experts" training recipes as written.

The code blocks after ``<!-- moe-recipe: NAME -->`` run in one namespace in
page order (the Linen block reuses ``x`` and ``target`` from the NNX
block); each recipe's loss must decrease and the DeepSeek bias update must
move ``score_correction_bias``.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

PAGE = pathlib.Path(__file__).parents[2] / 'docs' / 'moe.md'


def _recipes() -> dict[str, str]:
  section = PAGE.read_text()
  pattern = r'<!-- moe-recipe: ([\w-]+) -->\n```python\n(.*?)```'
  return dict(re.findall(pattern, section, flags=re.DOTALL))


def test_moe_training_recipes_run_and_learn():
  blocks = _recipes()
  assert list(blocks) == ['nnx', 'linen']
  namespace = {'__name__': 'docs_moe_recipe'}
  for name, code in blocks.items():
    exec(compile(code, f'docs/moe.md[moe-recipe: {name}]', 'exec'), namespace)
  for key in ('losses', 'linen_losses'):
    losses = namespace[key]
    assert len(losses) == 20 and all(np.isfinite(losses)), key
    assert losses[-1] < 0.8 * losses[0], (key, losses)
  bias = np.asarray(namespace['model'].score_correction_bias[...])
  assert np.any(bias != 0) and np.all(np.abs(bias) <= 20 * 1e-3 + 1e-7)
