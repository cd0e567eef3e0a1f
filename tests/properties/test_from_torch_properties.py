"""``from_torch`` over generated corruptions of a real Mixtral state dict.

Every corruption either raises the documented ``ValueError`` naming the
key, or loads a layer that reproduces the PyTorch module: never a silent
wrong load.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, note
from hypothesis import strategies as st

from flaxact import nnx as fx
from tests.moe_torch_helpers import REFERENCE, state_dict

CASE = REFERENCE['mixtral']
CORRUPTIONS = ('remove', 'rename', 'add', 'transpose', 'reshape', 'int', 'nan')
# transformers and flaxact sum float32 contributions in different orders
F32_VS_TORCH = dict(rtol=1e-5, atol=1e-5)


@given(
  st.sampled_from(['per_expert', 'stacked']),
  st.sampled_from(CORRUPTIONS),
  st.data(),
)
def test_corruptions_raise_naming_the_key_or_load_faithfully(fmt, how, data):
  sd, prefix = state_dict('mixtral', fmt)
  keys = sorted(sd)
  key = data.draw(st.sampled_from(keys))
  note(f'{how} {key!r} ({fmt})')
  sd = dict(sd)
  value = np.asarray(sd[key])
  if how == 'remove':
    del sd[key]
  elif how == 'rename':
    sd[key + '_renamed'] = sd.pop(key)
  elif how == 'add':
    sd[prefix + 'extra.weight'] = value
  elif how == 'transpose':
    if value.ndim < 2 or value.shape[-1] == value.shape[-2]:
      return
    sd[key] = np.swapaxes(value, -1, -2)
  elif how == 'reshape':
    sd[key] = value.reshape(-1)
  elif how == 'int':
    sd[key] = value.astype(np.int32)
  else:
    sd[key] = np.full_like(value, np.nan)
  short = key.removeprefix(prefix)
  try:
    layer = fx.from_torch(
      sd, layout='mixtral', prefix=prefix, strict=False, config=CASE['config']
    )
  except (ValueError, TypeError) as err:
    assert short in str(err) or how == 'add', err
    return
  if how == 'nan':  # loaded as given (PyTorch would compute with it too)
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert any(np.isnan(np.asarray(p)).any() for p in params)
    return
  assert how == 'add', how  # an extra key is ignored with strict=False
  with jax.default_matmul_precision('highest'):
    y = np.asarray(layer(CASE['x']))
  np.testing.assert_allclose(y, CASE['y'], **F32_VS_TORCH)


def test_strict_is_a_keyword():
  # the property passes strict=False to see the loose path too
  sd, prefix = state_dict('mixtral', 'per_expert')
  with pytest.raises(ValueError):
    fx.from_torch(
      {**sd, prefix + 'x': sd[prefix + 'gate.weight']},
      layout='mixtral',
      prefix=prefix,
      strict=True,
    )
