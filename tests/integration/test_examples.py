"""CI smoke tests of the examples: each runs as a user would run it.

Every example runs as a subprocess at a tiny setting; the tests check the
outputs it promises (the table rows on stdout, the JSON keys, the PNG) and
that bad arguments end with a one-line error and no traceback.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
EXAMPLES = os.path.join(ROOT, 'examples')
SHAKESPEARE = os.path.join(
  os.path.dirname(ROOT), 'shared', 'data', 'tinyshakespeare.txt'
)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# A model small enough to train in seconds.
TINY_LM = (
  '--d-model 32 --layers 1 --heads 2 --seq-len 32 --batch-size 8'
  ' --eval-every 5 --no-progress'
).split()


def require_shakespeare():
  """tiny Shakespeare's path; skips without it, but fails under ``CI=true``."""
  if not os.path.exists(SHAKESPEARE):
    message = f'tiny Shakespeare not found at {SHAKESPEARE} (shared/ data)'
    if os.environ.get('CI') == 'true':
      pytest.fail(f'{message}; CI must provide it')
    pytest.skip(message)
  return SHAKESPEARE


def import_examples(*names):
  """Imports modules of examples/ (``_cli``, ``charlm.train``, ...)."""
  sys.path.insert(0, EXAMPLES)
  try:
    return [importlib.import_module(name) for name in names]
  finally:
    sys.path.remove(EXAMPLES)


def run(script, *args, env=None, timeout=300):
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(
    [sys.executable, os.path.join(EXAMPLES, script), *map(str, args)],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=full_env,
    cwd=ROOT,
  )


def run_main_in_process(script, *args, capsys):
  """``script``'s ``main(args)`` in this process, as its ``__main__`` runs it.

  For the bad-argument cases, which end before any training: a subprocess
  each would spend its time importing JAX. ``test_bad_arguments_end_the_
  process`` runs one case of each script as a subprocess.
  """
  module, cli = import_examples(script.removesuffix('.py'), '_cli')
  try:
    code = cli.run_main(script, module.main, [str(a) for a in args])
  except SystemExit as e:  # argparse's errors
    code = e.code
  out = capsys.readouterr()
  return subprocess.CompletedProcess(script, code, out.out, out.err)


def assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC


def assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0, proc.stdout
  err = proc.stderr.strip()
  assert 'Traceback' not in err, err
  assert len(err.splitlines()) == 1, err
  for fragment in fragments:
    assert fragment in err, err


# ---------------------------------------------------------------------------
# glu_variants.py
# ---------------------------------------------------------------------------


def test_glu_variants_tiny_run(tmp_path):
  variants = ['relu', 'glu', 'swiglu']
  proc = run(
    'glu_variants.py',
    '--text',
    require_shakespeare(),
    '--steps',
    10,
    '--variants',
    ','.join(variants),
    '--out',
    tmp_path,
    *TINY_LM,
  )
  assert proc.returncode == 0, proc.stderr
  for name in ('FFN_ReLU', 'FFN_GLU', 'FFN_SwiGLU'):
    rows = [ln for ln in proc.stdout.splitlines() if f'| {name} ' in ln]
    assert len(rows) == 1, proc.stdout
    assert len(rows[0].split('|')) == 10  # 8 columns
  result = json.loads((tmp_path / 'results.json').read_text())
  for key in (
    'experiment',
    'complete',
    'config',
    'corpus',
    'versions',
    'devices',
    'summary',
    'runs',
    'paper_log_ppl',
    'validation',
  ):
    assert key in result, key
  assert result['complete'] is True
  assert result['corpus']['vocab_size'] == 65
  assert result['corpus']['train_characters'] == 1003854  # first 90%
  assert [s['variant'] for s in result['summary']] == variants
  for s in result['summary']:
    for key in (
      'params',
      'final_train_bpc',
      'val_bpc',
      'tokens_per_second',
      'rank',
      'gated',
    ):
      assert key in s, key
    assert math.isfinite(s['val_bpc']) and 0 < s['val_bpc'] < 7
  # Gated widths are cut to 2/3, so the parameter counts stay within 5%.
  params = [s['params'] for s in result['summary']]
  assert max(params) / min(params) < 1.05
  run0 = result['runs'][0]
  assert run0['curve']['step'] == [5, 10]
  assert len(run0['train_loss_per_step']) == 10
  assert_png(tmp_path / 'val_curves.png')


def test_glu_variants_curve_ends_at_the_table_number(tmp_path):
  # One definition of validation loss: the curve's last point, the JSON's
  # val_bpc and the table are the whole split; earlier points are labelled
  # estimates on a sample spread over it.
  proc = run(
    'glu_variants.py',
    '--text',
    require_shakespeare(),
    '--steps',
    7,
    '--variants',
    'reglu',
    '--curve-windows',
    40,
    '--out',
    tmp_path,
    *TINY_LM,
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads((tmp_path / 'results.json').read_text())
  run0 = result['runs'][0]
  curve = run0['curve']
  assert curve['step'] == [5, 7]
  assert curve['val_is_estimate'] == [True, False]
  assert curve['curve_windows'] == 40
  windows = (result['corpus']['val_characters'] - 1) // 32
  assert curve['val_windows'] == windows
  assert run0['val_tokens'] == windows * 32
  assert curve['val_bpc'][-1] == run0['val_bpc']
  assert result['summary'][0]['val_bpc'] == run0['val_bpc']
  assert 'estimate' in curve['intermediate_points']
  assert 'estimate' in result['validation']['curve']
  row = next(ln for ln in proc.stdout.splitlines() if '| FFN_ReGLU ' in ln)
  assert f' {run0["val_bpc"]:.4f} |' in row
  # --curve-windows 0: the whole split at every point, nothing estimated.
  proc = run(
    'glu_variants.py',
    '--text',
    SHAKESPEARE,
    '--steps',
    7,
    '--variants',
    'reglu',
    '--curve-windows',
    0,
    '--out',
    tmp_path,
    *TINY_LM,
  )
  assert proc.returncode == 0, proc.stderr
  curve = json.loads((tmp_path / 'results.json').read_text())['runs'][0][
    'curve'
  ]
  assert curve['val_is_estimate'] == [False, False]
  assert curve['val_bpc'][-1] == run0['val_bpc']  # same seed, same run


def test_glu_variants_builtin_corpus(tmp_path):
  proc = run(
    'glu_variants.py',
    '--steps',
    3,
    '--variants',
    'geglu',
    '--out',
    tmp_path,
    *TINY_LM,
  )
  assert proc.returncode == 0, proc.stderr
  assert 'built-in stdlib corpus' in proc.stdout
  result = json.loads((tmp_path / 'results.json').read_text())
  corpus = result['corpus']
  assert corpus['source'] == 'python-stdlib'
  assert corpus['files'][0] == 'argparse.py'
  assert corpus['characters'] > 500_000


@pytest.mark.parametrize(
  'make_args, fragments',
  [
    (lambda d: ['--text', d / 'missing.txt'], ['no such file']),
    (lambda d: ['--text', d / 'empty.txt'], ['is empty']),
    (lambda d: ['--text', d / 'latin1.txt'], ['not UTF-8', 'offset 3']),
    (lambda d: ['--text', d], ['is a directory']),
    (lambda d: ['--text', d / 'short.txt'], ['characters']),
    (lambda d: ['--steps', '0'], ['--steps', 'at least 1']),
    (lambda d: ['--steps', 'ten'], ['--steps']),
    (lambda d: ['--variants', 'relu,sparkle'], ["'sparkle'"]),
    (lambda d: ['--heads', '3'], ['divisible']),
  ],
  ids=[
    'missing',
    'empty',
    'non-utf8',
    'directory',
    'too-short',
    'zero-steps',
    'bad-int',
    'bad-variant',
    'heads',
  ],
)
def test_glu_variants_bad_arguments(tmp_path, make_args, fragments, capsys):
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'latin1.txt').write_bytes('abc\xe9t\xe9'.encode('latin-1'))
  (tmp_path / 'short.txt').write_text('To be, or not to be.\n')
  proc = run_main_in_process(
    'glu_variants.py',
    *make_args(tmp_path),
    '--out',
    tmp_path / 'out',
    capsys=capsys,
  )
  assert_one_line_error(proc, *fragments)
  assert not (tmp_path / 'out' / 'results.json').exists()


def test_charlm_is_deterministic():
  data, model, train = import_examples(
    'charlm.data', 'charlm.model', 'charlm.train'
  )
  corpus = data.load_corpus(None, seq_len=16)
  model_cfg = model.ModelConfig(len(corpus.vocab), 16, 1, 2, 16)
  train_cfg = train.TrainConfig(steps=4, batch_size=4, eval_every=2)
  a, b = (
    train.fit(corpus, model_cfg, train_cfg, 'swiglu', 7, progress=False)
    for _ in range(2)
  )
  assert a['train_loss_per_step'] == b['train_loss_per_step']
  assert a['val_bpc'] == b['val_bpc']
  c = train.fit(corpus, model_cfg, train_cfg, 'swiglu', 8, progress=False)
  assert c['train_loss_per_step'] != a['train_loss_per_step']


def test_validation_covers_the_whole_split():
  import jax.numpy as jnp
  import numpy as np

  data, validation = import_examples('charlm.data', 'charlm.validation')
  ids = np.arange(1000, dtype=np.int32)
  windows = data.eval_windows(ids, 10)
  assert windows.shape == (99, 11)
  np.testing.assert_array_equal(windows[:, 1:].ravel(), ids[1:991])
  # The curve's sample runs from the first window to the last.
  sample = data.spread_sample(windows, 5)
  assert [int(w[0]) for w in sample] == [0, 240, 490, 740, 980]
  assert data.spread_sample(windows, 0) is windows
  # Padding repeats windows, but every window counts exactly once: the
  # loss equals the plain mean over all windows, for any batch size.
  score = lambda params, batch: jnp.asarray(batch[:, 0] % 7, jnp.float32)
  expected = float(np.mean(windows[:, 0] % 7)) / math.log(2)
  for batch_size in (1, 8, 16, 200):
    v = validation.Validator(
      ids, 10, batch_size=batch_size, curve_windows=5, put=jnp.asarray
    )
    assert v.estimate and (v.windows, v.sample_windows) == (99, 5)
    assert math.isclose(v.whole_split(score, None), expected, rel_tol=1e-6)
  v = validation.Validator(
    ids, 10, batch_size=8, curve_windows=0, put=jnp.asarray
  )
  assert not v.estimate
  assert v.curve_point(score, None) == v.whole_split(score, None)


def test_flags_come_from_the_config_dataclasses():
  import argparse
  import dataclasses

  _cli, flags, model, train = import_examples(
    '_cli', 'charlm.flags', 'charlm.model', 'charlm.train'
  )
  p = argparse.ArgumentParser()
  flags.add_common_flags(p)
  args = p.parse_args([])
  assert _cli.from_args(train.TrainConfig, args) == train.TrainConfig()
  assert _cli.from_args(
    model.ModelConfig, args, vocab_size=65
  ) == model.ModelConfig(vocab_size=65)
  # Every option field has a flag; vocab_size comes from the corpus.
  fields = [
    f.name
    for cls in (model.ModelConfig, train.TrainConfig)
    for f in dataclasses.fields(cls)
  ]
  assert sorted(n for n in fields if n in vars(args)) == sorted(
    n for n in fields if n != 'vocab_size'
  )
  args = p.parse_args(['--steps', '7', '--warmup', '0', '--lr', '0.01'])
  cfg = _cli.from_args(train.TrainConfig, args)
  assert (cfg.steps, cfg.warmup, cfg.lr) == (7, 0, 0.01)
  # A script may replace a default (sharded_training: 100 steps).
  p = argparse.ArgumentParser()
  flags.add_common_flags(p, steps=100)
  assert p.parse_args([]).steps == 100
  with pytest.raises(TypeError, match='no flag'):
    flags.add_common_flags(argparse.ArgumentParser(), stpes=100)


# ---------------------------------------------------------------------------
# gelu_mlp_digits.py
# ---------------------------------------------------------------------------


def test_gelu_mlp_digits_tiny_run(tmp_path):
  proc = run(
    'gelu_mlp_digits.py',
    *'--seeds 2 --epochs 4 --batch-size 32 --depth 3 --width 32'.split(),
    '--out',
    tmp_path,
  )
  assert proc.returncode == 0, proc.stderr
  for name in ('gelu', 'relu', 'elu'):
    rows = [ln for ln in proc.stdout.splitlines() if f'| {name} ' in ln]
    assert len(rows) == 1, proc.stdout
    assert '%' in rows[0]
  result = json.loads((tmp_path / 'results.json').read_text())
  for key in ('experiment', 'config', 'data', 'summary', 'runs'):
    assert key in result, key
  assert result['data'] == {
    'name': 'sklearn.datasets.load_digits',
    'train': 1257,
    'test': 540,
  }
  assert len(result['runs']) == 6
  for s in result['summary']:
    assert 0.0 <= s['min_test_error'] <= s['median_test_error'] <= 1.0
    assert s['median_test_error'] < 0.3  # chance is 90%
  assert_png(tmp_path / 'test_error.png')


@pytest.mark.parametrize(
  'args, fragments',
  [
    (['--seeds', '0'], ['--seeds']),
    (['--activations', 'swiglu'], ['split-form gated']),
    (['--activations', 'sparkle'], ["'sparkle'"]),
    (['--batch-size', '5000'], ['exceeds']),
  ],
  ids=['zero-seeds', 'gated', 'unknown', 'batch'],
)
def test_gelu_mlp_digits_bad_arguments(tmp_path, args, fragments, capsys):
  proc = run_main_in_process(
    'gelu_mlp_digits.py', *args, '--out', tmp_path, capsys=capsys
  )
  assert_one_line_error(proc, *fragments)


@pytest.mark.parametrize(
  'script, args, fragment',
  [
    ('glu_variants.py', ['--variants', 'relu,sparkle'], "'sparkle'"),
    ('gelu_mlp_digits.py', ['--seeds', '0'], '--seeds'),
  ],
)
def test_bad_arguments_end_the_process(tmp_path, script, args, fragment):
  proc = run(script, *args, '--out', tmp_path / 'out', timeout=120)
  assert proc.returncode == 2
  assert_one_line_error(proc, fragment)
  assert not (tmp_path / 'out' / 'results.json').exists()


# ---------------------------------------------------------------------------
# sharded_training.py
# ---------------------------------------------------------------------------

EIGHT_CPUS = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


def test_sharded_training_matches_single_device(tmp_path):
  proc = run(
    'sharded_training.py',
    '--steps',
    8,
    '--mesh',
    '4x2',
    '--out',
    tmp_path,
    *TINY_LM,
    env=EIGHT_CPUS,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'MATCH at rtol' in proc.stdout
  rows = [ln for ln in proc.stdout.splitlines() if ln.startswith('| cpu:')]
  assert len(rows) == 8, proc.stdout
  result = json.loads((tmp_path / 'results.json').read_text())
  assert result['mesh'] == {'data': 4, 'model': 2}
  assert result['match'] is True
  assert result['max_relative_loss_difference'] <= 1e-3
  per_device = result['param_bytes_per_device']
  assert len(per_device) == 8
  # FSDP x TP: every device holds a fraction of the parameters.
  assert max(per_device.values()) < result['param_bytes_total'] / 4
  specs = result['param_specs']
  assert specs['blocks/0/ffn/gate_proj/kernel/value'] == "P('data', 'model')"
  assert specs['blocks/0/ffn/down_proj/kernel/value'] == "P('model', 'data')"
  for name in ('sharded', 'single_device'):
    run0 = result[name]
    assert run0['curve']['val_bpc'][-1] == run0['val_bpc']
    assert run0['curve']['val_is_estimate'][-1] is False
  assert_png(tmp_path / 'loss.png')


def test_sharded_training_bad_mesh(tmp_path):
  proc = run(
    'sharded_training.py',
    '--mesh',
    '3x3',
    '--out',
    tmp_path,
    *TINY_LM,
    env=EIGHT_CPUS,
    timeout=120,
  )
  assert_one_line_error(proc, '--mesh 3x3 needs 9 devices; 8 available')
