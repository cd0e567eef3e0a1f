"""The README's "Quantization and LoRA" recipes, run as written.

The section's code blocks (each after a ``<!-- recipe: NAME -->`` marker)
run in order in one namespace; the test then checks what the section
claims: quantization changed the output by the tabled error, served AQT
equals trained AQT, and LoRA starts at the float output.
"""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).parent.parent / 'README.md'
SECTION = '## Quantization and LoRA'

pytestmark = [
  pytest.mark.filterwarnings('ignore::DeprecationWarning:qwix'),
  pytest.mark.filterwarnings(
    "ignore:'.value' setter is now deprecated:DeprecationWarning"
  ),
  pytest.mark.filterwarnings(
    'ignore:Implicit conversion of an array to a dtype:DeprecationWarning'
  ),
]


def _section() -> str:
  text = README.read_text()
  start = text.index(SECTION)
  end = text.find('\n## ', start + len(SECTION))
  return text[start : end if end >= 0 else len(text)]


def _error(y, ref) -> float:
  return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))


def test_recipes_run_and_match_the_table():
  section = _section()
  pattern = r'<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```'
  blocks = re.findall(pattern, section, flags=re.DOTALL)
  assert [name for name, _ in blocks] == ['qat', 'ptq', 'lora', 'aqt']
  ns: dict = {'__name__': 'readme_recipe'}
  for name, code in blocks:
    exec(compile(code, f'README.md[{name}]', 'exec'), ns)
  y, y_linen = ns['y_float'], ns['y_linen_float']
  measured = {
    'qat': _error(ns['y_qat'], y),
    'static': _error(ns['y_static'], y),
    'ptq': _error(ns['y_ptq'], y),
    'linen_ptq': _error(ns['y_linen_ptq'], y_linen),
    'aqt': _error(ns['y_aqt'], y_linen),
    'aqt_nnx': _error(ns['y_aqt_nnx'], y),
  }
  tabled = {
    'qat': 0.017,
    'static': 0.156,
    'ptq': 0.0078,
    'linen_ptq': 0.0090,
    'aqt': 0.021,
    'aqt_nnx': 0.019,
  }
  for key, value in tabled.items():
    # The table rounds to two significant digits.
    assert measured[key] == pytest.approx(value, rel=0.05), (key, measured)
  assert _error(ns['y_lora'], y) == 0.0
  assert bool(jnp.all(ns['y_served'] == ns['y_aqt']))
  lora_leaves = {
    key
    for proj in ns['lora_grads'].values()
    for key in proj
    if key.startswith('kernel_lora')
  }
  assert lora_leaves == {'kernel_lora_a', 'kernel_lora_b'}
