"""CI smoke test of examples/moe_lm.py, run as a user would run it.

One tiny run of the dense arm and the two MoE arms checks the promised
outputs (table rows, JSON keys, PNG) and what the numbers must satisfy by
construction (expert load summing to tokens x k, the sigmoid router's bias
moving by the update rule, the softmax arm recording its balancing loss);
the parameter budgets of all default arms are checked in-process on
abstract models; bad arguments end with a one-line error.
"""

import json
import math

import numpy as np
import pytest

from tests.integration.test_examples import (
  assert_one_line_error,
  assert_png,
  import_examples,
  require_shakespeare,
  run,
)

TINY = (
  '--d-model 32 --layers 1 --heads 2 --seq-len 32 --batch-size 32'
  ' --eval-every 3 --steps 6 --experts 4 --top-k 2 --bias-rate 0.01'
  ' --no-progress'
).split()
ARMS = {
  'dense': 'dense SwiGLU',
  'moe_softmax': 'MoE softmax + LB loss',
  'moe_sigmoid': 'MoE sigmoid + bias',
}


def test_moe_lm_tiny_run(tmp_path):
  proc = run(
    'moe_lm.py',
    '--text',
    require_shakespeare(),
    '--arms',
    ','.join(ARMS),
    '--out',
    tmp_path,
    *TINY,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for label in ARMS.values():
    rows = [ln for ln in proc.stdout.splitlines() if f'| {label} ' in ln]
    assert len(rows) == 1, proc.stdout
    assert len(rows[0].split('|')) == 11  # 9 columns
  result = json.loads((tmp_path / 'results.json').read_text())
  for key in (
    'experiment',
    'complete',
    'config',
    'widths',
    'corpus',
    'versions',
    'devices',
    'validation',
    'load_imbalance',
    'summary',
    'runs',
  ):
    assert key in result, key
  assert result['complete'] is True
  assert result['widths'] == {'dense': 88, 'expert': 44, 'total': 176}
  summary = {s['arm']: s for s in result['summary']}
  assert list(summary) == list(ARMS)
  for s in summary.values():
    assert math.isfinite(s['val_bpc']) and 0 < s['val_bpc'] < 7
    assert s['tokens_per_second'] > 0
  # Equal active parameters, but for the router's d * E.
  dense, soft = summary['dense'], summary['moe_softmax']
  assert soft['active_params'] - dense['active_params'] == 32 * 4
  assert dense['active_params'] == dense['total_params']
  assert dense['load_imbalance'] is None
  runs = {r['arm']: r for r in result['runs']}
  for arm in ('moe_softmax', 'moe_sigmoid'):
    r, s = runs[arm], summary[arm]
    load = np.array(r['expert_load'])
    assert load.shape == (6, 1, 4)  # steps, layers, experts
    np.testing.assert_array_equal(load.sum(-1), 32 * 32 * 2)  # tokens * k
    assert 1.0 <= s['load_imbalance'] <= 2.0  # at most E / k
    assert r['curve']['val_bpc'][-1] == r['val_bpc']
    assert r['curve']['step'] == [3, 6]
  # The softmax arm records its balancing loss (k when balanced, up to E).
  balance = runs['moe_softmax']['balance_loss_per_step']
  assert len(balance) == 6 and all(1.9 < x <= 4 for x in balance)
  assert runs['moe_softmax']['score_correction_bias'] is None
  # The sigmoid arm's bias moved by +-rate or 0 per step: 6 steps x 0.01.
  bias = np.array(runs['moe_sigmoid']['score_correction_bias'])
  assert bias.shape == (1, 4)
  assert np.abs(bias).max() > 0
  np.testing.assert_allclose(bias * 100, np.round(bias * 100), atol=1e-4)
  assert np.abs(bias).max() <= 0.06 + 1e-6
  assert_png(tmp_path / 'moe_lm.png')


def test_moe_lm_parameter_budgets():
  # Equal active parameters with dense, equal total with dense_total (up to
  # the router's d * E per layer), at the default widths.
  from flax import nnx

  model, arms = import_examples('charlm.model', 'moelm.arms')
  cfg = arms.MoEConfig()
  mcfg = model.ModelConfig(vocab_size=65, d_model=64, layers=2)
  assert arms.widths(64, cfg) == {'dense': 176, 'expert': 88, 'total': 704}
  counts = {
    arm: arms.param_counts(
      nnx.eval_shape(  # shapes only: nothing is initialised
        lambda arm=arm: model.build_model(
          mcfg, 'swiglu', 0, ffn=arms.ffn_factory(arm, cfg)
        )
      ),
      arm,
      cfg,
    )
    for arm in arms.DEFAULT_ARMS
  }
  router = 2 * 64 * 8
  assert counts['moe_softmax'] == counts['moe_sigmoid']
  moe = counts['moe_softmax']
  assert moe['active'] - counts['dense']['active'] == router
  assert moe['total'] - counts['dense_total']['total'] == router
  assert moe['ffn_active_per_layer'] == 64 * 8 + 2 * 3 * 64 * 88
  assert moe['ffn_total_per_layer'] == 64 * 8 + 8 * 3 * 64 * 88
  assert counts['dense_total']['active'] == counts['dense_total']['total']


@pytest.mark.parametrize(
  'args, fragments',
  [
    (['--top-k', '9'], ['--top-k 9 exceeds --experts 8']),
    (['--arms', 'dense,sparkle'], ["'sparkle'", 'moe_sigmoid']),
    (['--experts', '0'], ['--experts', 'at least 1']),
  ],
  ids=['top-k', 'unknown-arm', 'zero-experts'],
)
def test_moe_lm_bad_arguments(tmp_path, args, fragments):
  proc = run('moe_lm.py', *args, '--out', tmp_path / 'out', timeout=120)
  assert_one_line_error(proc, *fragments)
  assert not (tmp_path / 'out').exists()
