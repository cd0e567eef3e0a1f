"""The benchmarks run, follow their method and refuse a busy machine.

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
QUANTIZED = os.path.join(ROOT, 'benchmarks', 'moe_quantized.py')


def _run(*args, script=SCRIPT):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run(
    [sys.executable, script, *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )


def test_quick_run_writes_every_row_with_its_load_and_memory(tmp_path):
  # every impl, one round: the rows, their memory, the load and the
  # recommendation line of --impls all
  out = tmp_path / 'moe.json'
  done = _run(
    '--quick', '--no-layer', '--shapes', 'coarse', '--impls', 'all',
    '--repeats', '1', '--allow-busy', '--json', str(out),
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  rows = r['shapes']['coarse']
  want = {'dense', 'floor', 'routing', 'loop', 'tiles', 'ragged'}
  assert want | {'nnx_layer', 'linen_layer'} <= set(rows)
  assert set(r['temp_bytes']['coarse']) == set(rows)
  assert all(v > 0 for v in r['temp_bytes']['coarse'].values())
  assert len(r['load']['before']) == 3 and len(r['load']['after']) == 3
  assert 'load average before' in done.stdout
  line = [ln for ln in done.stdout.splitlines() if 'recommended impl' in ln]
  assert len(line) == 1 and "impl='auto' picks" in line[0], done.stdout


def test_refuses_a_busy_machine_unless_told():
  done = _run('--quick', '--no-layer', '--shapes', 'coarse', '--max-load', '-1')
  assert done.returncode != 0
  assert 'not be publishable' in done.stderr
  assert 'MoE forward+backward' not in done.stdout


def test_quantized_benchmark_quick_run(tmp_path):
  out = tmp_path / 'moe_quantized.json'
  done = _run('--quick', '--allow-busy', '--json', str(out), script=QUANTIZED)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  assert set(r['frameworks']) == {'linen', 'nnx'}
  for fw in r['frameworks'].values():
    assert set(fw['ratios']) == {
      'qat_step', 'ptq_fwd', 'ptq_dense_fwd', 'ptq_weight_bytes'
    }  # fmt: skip
    assert all(v > 0 for v in fw['temp_bytes'].values())
    # int8 values + (E, 1, out) scales; the grouped path equals 'dense'
    assert fw['ratios']['ptq_weight_bytes'] < 0.3
    assert fw['ptq_auto_vs_dense'] < 1e-5
  assert 'goal <= 1.3' in done.stdout and 'load average before' in done.stdout


def test_ffn_benchmark_quick_run(tmp_path):
  out = tmp_path / 'ffn.json'
  script = os.path.join(ROOT, 'benchmarks', 'ffn.py')
  done = _run(
    '--quick', '--no-torch', '--no-qat', '--layers', '2', '--dtypes',
    'float32', '--allow-busy', '--json', str(out), script=script,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  f32 = r['float32']
  assert set(f32['time_s']) == set(f32['min_time_s']) == set(f32['temp_bytes'])
  assert f32['single_vs_matmul'] > 0 and f32['single_vs_matmul_min'] > 0
  assert f32['linen_stack_memory'] < 1  # two residuals instead of four
  assert len(r['load']['before']) == 3 and 'busy' in r['load']
  assert 'load average before' in done.stdout
