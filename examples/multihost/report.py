"""The results table, the results file's summary, and the plot."""

from __future__ import annotations

import math

import _cli
import numpy as np


def summary(result: dict) -> dict:
  """The figures the table shows, from a run's results."""
  seconds = np.array(result['step_seconds'][1:] or result['step_seconds'])
  ckpt = result['checkpoint']
  tokens = (
    result['config']['train']['batch_size']
    * (result['config']['model']['seq_len'])
  )
  median = float(np.median(seconds))
  return {
    'processes': result['processes'],
    'devices': len(result['devices']),
    'mesh': f'{result["mesh"]["data"]}x{result["mesh"]["expert"]}',
    'steps': f'{result["first_step"]}-{result["last_step"]}',
    'final_train_bpc': result['train_loss_per_step'][-1] / math.log(2),
    'val_bpc': result['curve']['val_bpc'][-1],
    'median_step_ms': 1e3 * median,
    'tokens_per_second': tokens / median,
    'checkpoint_mb': ckpt['bytes'] / 2**20,
    'save_blocking_s': float(np.mean(ckpt['save_blocking_seconds'])),
    'save_finish_s': ckpt['final_wait_seconds'],
    'restore_s': ckpt['restore_seconds'],
  }


def table(s: dict) -> str:
  """One row per run (Markdown)."""
  restore = '–' if s['restore_s'] is None else f'{s["restore_s"]:.2f}'
  return _cli.format_table(
    [
      'processes',
      'devices',
      'mesh (data x expert)',
      'steps',
      'final train (bpc)',
      'val (bpc)',
      'step (ms, median)',
      'tokens/s',
      'checkpoint (MiB)',
      'save: blocking (s)',
      'save: last to disk (s)',
      'restore (s)',
    ],
    [
      (
        s['processes'],
        s['devices'],
        s['mesh'],
        s['steps'],
        f'{s["final_train_bpc"]:.4f}',
        f'{s["val_bpc"]:.4f}',
        f'{s["median_step_ms"]:.1f}',
        f'{s["tokens_per_second"]:,.0f}',
        f'{s["checkpoint_mb"]:.2f}',
        f'{s["save_blocking_s"]:.3f}',
        f'{s["save_finish_s"]:.3f}',
        restore,
      )
    ],
  )


def serve_table(layouts: list[dict]) -> str:
  """One row per restored layout (Markdown)."""
  return _cli.format_table(
    [
      'layout',
      'devices',
      'restore or quantize (s)',
      'max |Δ logit|',
      'relative',
      'loss (nats)',
      'Δ loss (relative)',
      'params equal',
    ],
    [
      (
        r['layout'],
        r['devices'],
        f'{r["restore_seconds"]:.3f}',
        f'{r["max_abs_logit_difference"]:.3g}',
        f'{r["max_rel_logit_difference"]:.3g}',
        f'{r["next_char_loss"]:.6f}',
        f'{r["rel_loss_difference"]:.3g}',
        'yes' if r['params_equal_one_device'] else 'NO',
      )
      for r in layouts
    ],
  )


def plot(result: dict, path: str) -> None:
  """Training and validation loss, and each step's time."""
  plt = _cli.pyplot()
  steps = np.array(result['steps'])
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  a1.plot(
    steps, np.array(result['train_loss_per_step']) / math.log(2), label='train'
  )
  curve = result['curve']
  a1.plot(curve['step'], curve['val_bpc'], 'o-', label='validation')
  for s in result['checkpoint']['steps_saved']:
    a1.axvline(s, color='grey', lw=0.5, alpha=0.5)
  a1.set_xlabel('step (grey: checkpoints)')
  a1.set_ylabel('loss (bits per character)')
  a1.set_title(
    f'{result["processes"]} process(es), mesh'
    f' {result["mesh"]["data"]}x{result["mesh"]["expert"]}'
  )
  a1.legend()
  a2.semilogy(steps, 1e3 * np.array(result['step_seconds']))
  a2.set_xlabel('step')
  a2.set_ylabel('step time (ms; the first compiles)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
