"""The docs' "Quantization and LoRA" recipes, run as written.

The section's code blocks (each after a ``<!-- recipe: NAME -->`` marker)
run in order in one namespace; the test then checks what the section
claims: quantization changed the output by the tabled error, served AQT
equals trained AQT, LoRA starts at the float output, and the MoE recipe
quantizes the experts (int8 expert kernels, float router) and trains.
:func:`test_moe_router_and_grouped_impl_claims` checks the figures of the
"Mixture of experts" section's quantization paragraph.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from flaxact import nnx as fx
from tests.moe_quantization_helpers import warns_grouped

PAGE = pathlib.Path(__file__).parents[2] / 'docs' / 'quantization.md'

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
  return PAGE.read_text()


def _error(y, ref) -> float:
  return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))


def test_recipes_run_and_match_the_table():
  section = _section()
  pattern = r'<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```'
  blocks = re.findall(pattern, section, flags=re.DOTALL)
  assert [name for name, _ in blocks] == ['qat', 'ptq', 'lora', 'aqt', 'moe']
  ns: dict = {'__name__': 'docs_recipe'}
  for name, code in blocks:
    exec(compile(code, f'docs/quantization.md[{name}]', 'exec'), ns)
  y, y_linen = ns['y_float'], ns['y_linen_float']
  measured = {
    'qat': _error(ns['y_qat'], y),
    'static': _error(ns['y_static'], y),
    'ptq': _error(ns['y_ptq'], y),
    'linen_ptq': _error(ns['y_linen_ptq'], y_linen),
    'aqt': _error(ns['y_aqt'], y_linen),
    'aqt_nnx': _error(ns['y_aqt_nnx'], y),
    'moe_qat': _error(ns['y_moe_qat'], ns['y_moe_float']),
    'moe_ptq': _error(ns['y_moe_ptq'], ns['y_moe_float']),
    'moe_aqt': _error(ns['y_moe_aqt'], ns['y_moe_linen_float']),
  }
  tabled = {
    'qat': 0.017,
    'static': 0.156,
    'ptq': 0.0078,
    'linen_ptq': 0.0090,
    'aqt': 0.021,
    'aqt_nnx': 0.019,
    'moe_qat': 0.019,
    'moe_ptq': 0.0077,
    'moe_aqt': 0.028,
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
  _check_moe(ns)


def _check_moe(ns: dict) -> None:
  """The MoE recipe quantized the experts, left the router float, trained."""
  assert ns['expert_int8'].qvalue.dtype == jnp.int8
  assert ns['expert_int8'].qvalue.shape == (8, 64, 128)
  # One scale per expert and output channel.
  assert ns['expert_int8'].scale.shape == (8, 1, 128)
  ptq = ns['moe_ptq']
  assert ptq.router.kernel[...].dtype == jnp.float32  # the rule skips it
  for name in ('up_proj', 'down_proj'):
    assert getattr(ptq, name).kernel[...].array.qvalue.dtype == jnp.int8
  grads = nnx.to_pure_dict(ns['moe_grads'])
  for name in ('router', 'gate_proj', 'up_proj', 'down_proj'):
    assert np.any(np.asarray(grads[name]['kernel']) != 0), name
  aqt = ns['moe_converted']['aqt']
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    assert aqt[name]['AqtDotGeneral_0']['qrhs']['value'].dtype == jnp.int8
  assert bool(jnp.all(ns['y_moe_served'] == ns['y_moe_aqt']))


def _moe_qat_error(layer, x, module_path: str) -> float:
  rule = qwix.QtRule(
    module_path=module_path, weight_qtype='int8', act_qtype='int8'
  )
  qat = qwix.quantize_model(layer, qwix.QtProvider([rule]), x)
  return _error(qat(x), layer(x))


def test_moe_router_and_grouped_impl_claims():
  """The measured figures of the "Mixture of experts" quantization text."""
  small = fx.MoE(16, 32, 4, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  # An int8 router changes which experts are chosen; leaving it out keeps
  # the error at the experts' quantization error.
  assert _moe_qat_error(small, x, '.*') == pytest.approx(0.46, rel=0.05)
  assert _moe_qat_error(small, x, '^(?!router).*') == pytest.approx(
    0.016, rel=0.05
  )
  # A rule matching the MoE module itself ('' at top level) reaches the
  # explicit 'loop' impl's forward matmuls (the recipe's layer and input).
  loop = fx.MoE(64, 128, 8, 2, impl='loop', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 8, 64))
  with warns_grouped():
    error = _moe_qat_error(loop, x, '')
  assert error == pytest.approx(0.019, rel=0.05)
