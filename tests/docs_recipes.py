"""Runs the code blocks of the docs page "Checkpoints and export".

Each block follows an HTML comment ``<!-- recipe: NAME -->``; a chain of names
(``('nnx', 'nnx-mesh')``) runs in one namespace, in order, with ``ckpt_dir``
set, exactly as ``docs/checkpoints.md`` shows them.
``tests/integration/test_checkpoints.py`` runs the one-device chains in its own
process and this file as a script for the mesh chains, on 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): it prints one
JSON object with, per chain, a comparison of every saved and restored leaf (or
the traceback).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import traceback

ROOT = pathlib.Path(__file__).parent.parent
PAGE = ROOT / 'docs' / 'checkpoints.md'
MESH_CHAINS = {
  'nnx-mesh': ('nnx', 'nnx-mesh'),
  'linen-mesh': ('linen', 'linen-mesh'),
}


def recipes() -> dict[str, str]:
  """The page's marked code blocks, by name, in page order."""
  section = PAGE.read_text()
  pattern = r'<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```'
  return dict(re.findall(pattern, section, flags=re.DOTALL))


def run(chain, ckpt_dir: pathlib.Path) -> dict:
  """Executes the blocks of ``chain`` in one namespace; returns it."""
  blocks = recipes()
  namespace = {'ckpt_dir': ckpt_dir, '__name__': 'docs_recipe'}
  for name in chain:
    exec(
      compile(blocks[name], f'docs/checkpoints.md[{name}]', 'exec'), namespace
    )
  return namespace


def compare(saved, restored) -> dict:
  """Per leaf path: sharding spec, device count and equality of both trees."""
  import jax
  import numpy as np

  saved_leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
  restored_leaves = jax.tree.leaves(restored)
  if len(saved_leaves) != len(restored_leaves):
    raise ValueError(
      f'{len(saved_leaves)} leaves saved, {len(restored_leaves)} restored'
    )
  out = {}
  for (path, a), b in zip(saved_leaves, restored_leaves, strict=True):
    out[jax.tree_util.keystr(path)] = {
      'spec': str(getattr(a.sharding, 'spec', None)),
      'devices': len(a.sharding.device_set),
      'same_sharding': a.sharding == b.sharding,
      'same_dtype': str(a.dtype) == str(b.dtype),
      'equal': bool(np.array_equal(np.asarray(a), np.asarray(b))),
    }
  return out


def _mesh_facts(name: str, ns: dict) -> dict:
  from flax import nnx

  if name == 'nnx-mesh':
    saved = {'model': nnx.state(ns['model']), 'opt': nnx.state(ns['optimizer'])}
    back = {
      'model': nnx.state(ns['model2']),
      'opt': nnx.state(ns['optimizer2']),
    }
    with ns['jax'].set_mesh(ns['mesh']):
      outputs_equal = bool(
        (ns['model2'](ns['x']) == ns['model'](ns['x'])).all()
      )
    return {'leaves': compare(saved, back), 'outputs_equal': outputs_equal}

  def apply(state):
    return ns['layer'].apply({'params': state['params']}, ns['x'])

  with ns['jax'].set_mesh(ns['mesh']), ns['nn'].logical_axis_rules(ns['rules']):
    outputs_equal = bool((apply(ns['restored']) == apply(ns['state'])).all())
  leaves = compare(ns['state'], ns['restored'])
  return {'leaves': leaves, 'outputs_equal': outputs_equal}


def main() -> None:
  from tests.multidevice import require_devices

  require_devices(8)
  ckpt_dir = pathlib.Path(sys.argv[1]).resolve()
  results = {}
  for name, chain in MESH_CHAINS.items():
    try:
      ns = run(chain, ckpt_dir)
      results[name] = _mesh_facts(name, ns)
    except Exception:  # reported per chain; the pytest side fails it
      results[name] = {'error': traceback.format_exc()}
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
