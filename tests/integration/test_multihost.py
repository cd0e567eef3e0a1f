"""``examples/multihost.py`` on localhost: 2 processes, faults, restores.

The script runs as users run it, in subprocesses: once uninterrupted
through its local launcher (``--num-processes 2``, 4 simulated CPU devices
each, mesh ``data=2 x expert=4``); once as two workers started by the test
(as on real hosts: ``--process-id``, ``--coordinator-address``), one of
them SIGKILLed after step 4, then resumed with ``--resume``; and once with
``--serve`` in one process, restoring the 2-process checkpoint on an
``expert=8`` mesh, on one device and as Qwix int8 PTQ. The resumed losses
must equal the uninterrupted run's bit for bit. The train step is also
lowered for TPU and CUDA on an abstract ``2 x 4`` mesh.

Every subprocess has a hard timeout, each test picks a free port, and a
``finally`` kills every child still running, so a hung process fails the
test instead of hanging CI. Compiled programs are shared through the test
run's persistent compilation cache, which the processes inherit
(``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.integration.test_examples import PNG_MAGIC, import_examples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SCRIPT = os.path.join(ROOT, 'examples', 'multihost.py')
STEPS = 6
KILL_AFTER = 4
TINY = (
  f'--steps {STEPS} --checkpoint-every 2 --d-model 32 --layers 2 --heads 2'
  ' --seq-len 16 --batch-size 8 --eval-every 3 --curve-windows 16'
  ' --no-progress --log-every 1'
).split()
TIMEOUT = 150  # seconds for one run, on a busy 2-core machine


def _env() -> dict[str, str]:
  return {
    **os.environ,
    'PYTHONPATH': ROOT,
    'PYTHONUNBUFFERED': '1',
  }


def _text(tmp) -> str:
  """A 24,000-character corpus: small validation split, quick to score."""
  path = tmp / 'corpus.txt'
  if not path.exists():
    with open(os.path.join(os.path.dirname(os.__file__), 'difflib.py')) as f:
      path.write_text(f.read()[:24_000])
  return str(path)


def _run(tmp, *args, timeout=TIMEOUT):
  """The script to completion (any process tree it starts is killed)."""
  proc = subprocess.Popen(
    [sys.executable, SCRIPT, '--text', _text(tmp), *map(str, args)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_env(),
    cwd=ROOT,
    start_new_session=True,  # its own process group: killed as one
  )
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.fail(f'multihost.py {args} did not finish in {timeout} s')
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  return proc.returncode, out, err


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp('multihost')


@pytest.fixture(scope='module')
def uninterrupted(tmp):
  """The reference: 2 processes by the launcher, never interrupted."""
  out_dir = tmp / 'uninterrupted'
  t0 = time.perf_counter()
  code, out, err = _run(tmp, *TINY, '--num-processes', 2, '--out', out_dir)
  assert code == 0, err[-3000:]
  result = json.loads((out_dir / 'results.json').read_text())
  return {
    'dir': out_dir,
    'out': out,
    'result': result,
    'seconds': time.perf_counter() - t0,
  }


def test_two_processes_train_on_one_global_mesh(uninterrupted):
  r = uninterrupted['result']
  assert r['processes'] == 2
  assert r['mesh'] == {'data': 2, 'expert': 4}
  assert len(r['devices']) == 8
  assert r['steps'] == list(range(1, STEPS + 1))
  assert r['data_position'] == STEPS * 8  # windows consumed, none twice
  losses = r['train_loss_per_step']
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert r['checkpoint']['steps_saved'] == [2, 4, 6]
  assert r['checkpoint']['bytes'] > r['param_bytes']['total']  # + moments
  # Each device holds 1/4 of the experts: less than the whole model.
  assert r['param_bytes']['first_device'] < r['param_bytes']['total']
  # Process 0 alone prints: one line per step, one table row.
  out = uninterrupted['out']
  assert [ln for ln in out.splitlines() if ln.startswith('step ')] == [
    f'step {s} loss {v!r}' for s, v in zip(r['steps'], losses, strict=True)
  ]
  assert len([ln for ln in out.splitlines() if ln.startswith('|  ')]) == 1
  assert r['curve']['step'] == [3, 6]
  with open(uninterrupted['dir'] / 'multihost.png', 'rb') as f:
    assert f.read(8) == PNG_MAGIC


def _worker(tmp, i, port, out_dir, *extra):
  cmd = [
    sys.executable,
    SCRIPT,
    '--text',
    _text(tmp),
    *TINY,
    '--out',
    str(out_dir),
    '--num-processes',
    '2',
    '--process-id',
    str(i),
    '--coordinator-address',
    f'127.0.0.1:{port}',
    *extra,
  ]
  return subprocess.Popen(
    cmd,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env=_env(),
    cwd=ROOT,
  )


def _kill_after_step(tmp, out_dir, step):
  """Two workers; SIGKILLs process 1 once process 0 logged ``step``.

  Returns the losses process 0 logged before the kill.
  """
  port = _cluster().free_port()
  procs = [_worker(tmp, i, port, out_dir) for i in range(2)]
  logged = {}
  deadline = time.monotonic() + TIMEOUT
  try:
    for line in procs[0].stdout:  # process 0 prints one line per step
      if time.monotonic() > deadline:
        pytest.fail(f'step {step} not reached in {TIMEOUT} s')
      if line.startswith('step '):
        _, s, _, loss = line.split()
        logged[int(s)] = float(loss)
        if int(s) == step:
          procs[1].send_signal(signal.SIGKILL)
          break
    assert step in logged, 'process 0 ended before the kill'
    assert procs[1].wait(timeout=30) == -signal.SIGKILL
  finally:
    for p in procs:  # process 0 would wait for its peer: the job is over
      if p.poll() is None:
        p.kill()
      p.wait()
      if p.stdout is not None:
        p.stdout.close()
  return logged


def _cluster():
  (cluster,) = import_examples('multihost.cluster')
  return cluster


def test_killed_process_resumes_bit_for_bit(tmp, uninterrupted):
  out_dir = tmp / 'faulty'
  logged = _kill_after_step(tmp, out_dir, KILL_AFTER)
  reference = uninterrupted['result']['train_loss_per_step']
  # Before the fault, the same losses as the uninterrupted run.
  assert [logged[s] for s in sorted(logged)] == reference[:KILL_AFTER]
  ckpt = out_dir / 'checkpoints'
  # A checkpoint that never finished (as if killed mid-write): ignored.
  shutil.copytree(ckpt / '2', ckpt / f'{STEPS}.orbax-checkpoint-tmp-1')
  code, out, err = _run(
    tmp, *TINY, '--num-processes', 2, '--resume', '--out', out_dir
  )
  assert code == 0, err[-3000:]
  r = json.loads((out_dir / 'results.json').read_text())
  start = r['resumed_from']
  # Step 2 was on disk before step 4 ran; step 4's may have been mid-write.
  assert start in (2, 4), start
  assert f'resumed from checkpoint {start}' in out
  assert r['steps'] == list(range(start + 1, STEPS + 1))  # none lost, none
  assert r['data_position'] == STEPS * 8  # repeated: the stream resumed
  assert r['train_loss_per_step'] == reference[start:]  # bit for bit
  assert r['checkpoint']['restore_seconds'] > 0
  assert not list(ckpt.glob('*.orbax-checkpoint-tmp*'))  # cleaned up
  assert (ckpt / str(STEPS) / 'params').is_dir()


def test_checkpoint_restores_on_other_topologies(tmp, uninterrupted):
  code, out, err = _run(
    tmp,
    '--serve',
    '--cpu-devices',
    8,
    '--out',
    uninterrupted['dir'],
  )
  assert code == 0, err[-3000:]
  served = json.loads((uninterrupted['dir'] / 'serve.json').read_text())
  assert served['step'] == STEPS
  rows = {r['layout']: r for r in served['layouts']}
  assert set(rows) == {'one device', 'expert mesh 1x8', 'int8 PTQ, one device'}
  assert all(r['params_equal_one_device'] for r in rows.values())
  # Float layouts: the 2-process logits up to summation order.
  for name in ('one device', 'expert mesh 1x8'):
    assert rows[name]['max_rel_logit_difference'] < 1e-5, rows[name]
  # int8 weights: a quantization error, not a different model.
  ptq = rows['int8 PTQ, one device']
  assert 0 < ptq['rel_loss_difference'] < 0.02, ptq
  for name in ('one device', 'expert mesh 1x8'):
    assert rows[name]['rel_loss_difference'] < 1e-6, rows[name]
  assert served['expert_kernel_dtype'] == 'int8'
  assert served['expert_kernel_shape'][0] == 8  # (E, in, hidden)
  assert '| expert mesh 1x8 ' in out


def test_train_step_lowers_for_tpu_and_gpu():
  from flax import nnx

  model, train, lm = import_examples(
    'charlm.model', 'charlm.train', 'multihost.lm'
  )
  model_cfg = model.ModelConfig(vocab_size=60, d_model=32, layers=2, heads=2)
  train_cfg = train.TrainConfig(steps=6, batch_size=8)
  moe_cfg = lm.MoEConfig()
  graphdef, params = lm.build(model_cfg, moe_cfg, 0)
  tx = train.make_optimizer(train_cfg)
  step, _ = lm.make_steps(graphdef, tx, moe_cfg, model_cfg.layers)
  mesh = AbstractMesh((2, 4), ('data', 'expert'), (AxisType.Auto,) * 2)
  with (
    jax.sharding.use_abstract_mesh(mesh),
    nnx.logical_axis_rules(lm.RULES),
  ):
    param_sh, batch_sh = lm.shardings(params, mesh)
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    replicated = NamedSharding(mesh, P())
    traced = jax.jit(step).trace(
      jax.tree.map(spec, params, param_sh),
      jax.tree.map(
        lambda x: spec(x, replicated), jax.eval_shape(tx.init, params)
      ),
      jax.ShapeDtypeStruct((8, 65), np.int32, sharding=batch_sh),
    )
    for platform in ('tpu', 'cuda'):
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      assert 'mhlo.num_partitions = 8' in text, platform
      assert 'all_to_all' in text, platform  # experts on their devices
