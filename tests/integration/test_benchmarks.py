"""The MoE benchmark runs, follows its method and refuses a busy machine.

Timings are never asserted (they belong to ``benchmarks/``); this keeps the
script working as the code under it changes, and checks what its method
promises: the load average is recorded, the JAX process never imports
torch, and every row reports its compiled temp memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'moe.py')


def _run(*args):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )


def test_quick_run_writes_every_row_with_its_load_and_memory(tmp_path):
  out = tmp_path / 'moe.json'
  done = _run(
    '--quick', '--no-layer', '--shapes', 'coarse', '--allow-busy',
    '--json', str(out),
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  rows = r['shapes']['coarse']
  want = {'dense', 'floor', 'routing', 'loop', 'tiles'}
  assert want | {'nnx_layer', 'linen_layer'} <= set(rows)
  assert set(r['temp_bytes']['coarse']) == set(rows)
  assert all(v > 0 for v in r['temp_bytes']['coarse'].values())
  assert len(r['load']['before']) == 3 and len(r['load']['after']) == 3
  assert 'load average before' in done.stdout


def test_refuses_a_busy_machine_unless_told():
  done = _run('--quick', '--no-layer', '--shapes', 'coarse', '--max-load', '-1')
  assert done.returncode != 0
  assert 'not be publishable' in done.stderr
  assert 'MoE forward+backward' not in done.stdout
