"""Mixture of experts vs dense SwiGLU FFNs, on a character-level LM.

A mixture-of-experts (MoE) FFN holds ``E`` expert FFNs and sends each token
to ``k`` of them, so it has about ``E / k`` times the parameters of the
dense FFN whose per-token cost it matches. This example trains ``charlm``'s
small transformer with four FFNs (``moelm.arms``): a dense SwiGLU; an MoE
SwiGLU of 8 experts, top-2, at **equal active parameters**, once with a
softmax router balanced by the load-balancing loss (Switch / Mixtral) and
once with a sigmoid router balanced by the bias update of DeepSeek-V3
(auxiliary-loss-free); and a dense SwiGLU with the MoE's **total**
parameters.

Run::

  python examples/moe_lm.py                       # built-in corpus
  python examples/moe_lm.py --text ../shared/data/tinyshakespeare.txt
  python examples/moe_lm.py --steps 100 --arms dense,moe_sigmoid   # quick

Shows a progress bar, prints a results table, and writes ``results.json``
and ``moe_lm.png`` (validation curves and a heat map of every expert's load
over training) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import _cli
import _results
import numpy as np
from charlm import data, flags
from charlm import train as charlm_train
from moelm import arms, train

DEFAULT_STEPS = 400


def build_parser() -> argparse.ArgumentParser:
  p = _cli.Parser(
    prog='moe_lm.py',
    description=(
      'Train a small character-level transformer with a dense SwiGLU FFN,'
      ' a mixture-of-experts SwiGLU at equal active parameters (softmax'
      ' router + load-balancing loss, and sigmoid router + bias-update'
      " balancing), and a dense SwiGLU with the MoE's total parameters;"
      ' print a table, write results.json and moe_lm.png. Data: the first'
      ' 90% of --text trains, the last 10% validates; without --text, the'
      ' source of 30 standard-library modules of the running Python (no'
      ' download). The default run, 4 arms x 400 steps, is sized to finish'
      ' within 5 minutes on 2 idle CPU cores (measured times: the'
      ' Examples and results page, docs/examples.md). The validation loss in'
      ' the table is the whole validation split.'
    ),
    formatter_class=_cli.HelpFormatter,
  )
  flags.add_common_flags(p, steps=DEFAULT_STEPS)
  _cli.add_flags(p, arms.MoEConfig)
  p.add_argument(
    '--arms',
    default=','.join(arms.DEFAULT_ARMS),
    help=f'comma-separated arms, from {",".join(arms.ARMS)}',
  )
  p.add_argument(
    '--seeds',
    type=_cli.positive_int,
    default=1,
    help='seeds per arm (0, 1, ..., K-1)',
  )
  p.add_argument(
    '--out',
    default='results/moe_lm',
    help='output directory for results.json and the plot',
  )
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  names = arms.parse_arms(args.arms)
  moe_cfg = _cli.from_args(arms.MoEConfig, args)
  moe_cfg.check()
  corpus = data.load_corpus(args.text, seq_len=args.seq_len)
  model_cfg, train_cfg = flags.configs_from_args(args, corpus)
  out_dir = _cli.prepare_out_dir(args.out)
  source = args.text or 'built-in stdlib corpus'
  print(
    f'{source}: {corpus.info["characters"]:,} characters, vocabulary'
    f' {corpus.info["vocab_size"]}; {len(names)} arms x {args.seeds}'
    f' seed(s) x {args.steps} steps; {moe_cfg.experts} experts, top-'
    f'{moe_cfg.top_k}',
    flush=True,
  )
  json_path = os.path.join(out_dir, 'results.json')
  configs = (model_cfg, train_cfg, moe_cfg)
  result = train_all(args, names, corpus, configs, json_path)
  print(report(result, args))
  png_path = os.path.join(out_dir, 'moe_lm.png')
  plot(result, png_path, os.path.basename(source))
  print(f'\nwrote {json_path} and {png_path}')


def train_all(args, names, corpus, configs, json_path: str) -> dict:
  """Trains every seed and arm; rewrites the JSON after each run."""
  runs, result = [], {}
  t_start = time.perf_counter()
  total = len(names) * args.seeds
  for seed in range(args.seeds):
    for arm in names:
      desc = f'[{len(runs) + 1}/{total}] {arm} seed {seed}'
      try:
        run = train.fit(
          corpus, *configs, arm, seed, desc=desc, progress=not args.no_progress
        )
      except FloatingPointError as e:
        raise _cli.UsageError(f'{e}; try a lower --lr') from None
      runs.append(run)
      load = run['final_load_imbalance']
      print(
        f'{desc}: val {run["val_bpc"]:.4f} bpc (whole validation split),'
        f' {run["tokens_per_second"] or 0:,.0f} tokens/s'
        + (f', load max/mean {max(load):.2f}' if load else ''),
        flush=True,
      )
      result = results_json(
        args,
        names,
        corpus,
        configs,
        runs,
        time.perf_counter() - t_start,
        complete=len(runs) == total,
      )
      _cli.write_json(json_path, result)  # after every run
  return result


def results_json(
  args, names, corpus, configs, runs, wall, *, complete: bool
) -> dict:
  """Everything a run measured, with the settings that produced it."""
  model_cfg, train_cfg, moe_cfg = configs
  done = [a for a in names if any(r['arm'] == a for r in runs)]
  return {
    'experiment': 'moe_lm',
    'complete': complete,
    'config': {
      'model': vars(model_cfg),
      'train': vars(train_cfg),
      'moe': vars(moe_cfg),
      'arms': {a: vars(arms.ARMS[a]) for a in names},
      'seeds': list(range(args.seeds)),
    },
    'widths': arms.widths(model_cfg.d_model, moe_cfg),
    **charlm_train.run_info(corpus, runs, wall),
    'load_imbalance': "per MoE layer, the busiest expert's share of the"
    f' routed tokens over the mean share, summed over the last'
    f' {train.FINAL_LOAD_STEPS} training steps (1 = balanced, E/k = every'
    ' token to the same k experts); the table shows the worst layer',
    'summary': summarise(runs, done),
    'runs': runs,
  }


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
  """Per-arm means and spreads over seeds, and each arm's rank."""

  def row(arm: str, rs: list[dict]) -> dict:
    loads = [
      max(r['final_load_imbalance']) for r in rs if r['final_load_imbalance']
    ]
    return {
      'arm': arm,
      'label': arms.ARMS[arm].label,
      'active_params': rs[0]['params']['active'],
      'total_params': rs[0]['params']['total'],
      'ffn_hidden': rs[0]['ffn_hidden'],
      **_results.lm_stats(rs),
      'load_imbalance': float(np.mean(loads)) if loads else None,
      'seeds': len(rs),
    }

  return _results.summarise(runs, names, key='arm', row=row, rank_by='val_bpc')


def report(result: dict, args) -> str:
  """The results table (Markdown) and a one-line setting summary."""
  moe = result['config']['moe']
  load = lambda s: (
    '–' if s['load_imbalance'] is None else f'{s["load_imbalance"]:.2f}'
  )
  return _results.lm_report(
    result,
    args,
    [
      _results.RANK,
      ('arm', lambda s: s['label']),
      _results.FFN_HIDDEN,
      ('active params', lambda s: f'{s["active_params"]:,}'),
      ('total params', lambda s: f'{s["total_params"]:,}'),
      _results.TRAIN_BPC,
      _results.VAL_BPC,
      _results.TOKENS_PER_SECOND,
      ('load max/mean', load),
    ],
    setting=f'MoE {moe["experts"]} experts top-{moe["top_k"]}, LB-loss'
    f' weight {moe["aux_coef"]:g}, bias rate {moe["bias_rate"]:g}; ',
    note='; load: busiest expert / mean, worst layer, last'
    f' {train.FINAL_LOAD_STEPS} steps',
  )


def plot(result: dict, path: str, source: str) -> None:
  """Validation curves, and each MoE arm's expert load over training.

  The heat maps (seed 0) show, per layer and expert, the share of routed
  tokens over the mean share in bins of steps: 1 (white) is balanced.
  """
  from matplotlib.colors import TwoSlopeNorm

  plt = _cli.pyplot()
  runs = result['runs']
  moe_runs = [r for r in runs if r['expert_load'] and r['seed'] == 0]
  fig, axes = plt.subplots(
    1,
    1 + len(moe_runs),
    figsize=(6.5 + 4.5 * len(moe_runs), 5.0),
    layout='constrained',
  )
  axes = np.atleast_1d(axes)
  ax = axes[0]
  for s in result['summary']:
    rs = [r for r in runs if r['arm'] == s['arm']]
    steps = rs[0]['curve']['step']
    val = np.mean([r['curve']['val_bpc'] for r in rs], axis=0)
    style = '-' if arms.ARMS[s['arm']].router else '--'
    (line,) = ax.plot(steps, val, style, label=s['label'])
    ax.plot(steps[-1], val[-1], 'o', color=line.get_color(), ms=4)
  ax.set_xlabel('training step')
  ax.set_ylabel('validation loss (bits per character)')
  ax.set_title(f'FFN arms on {source} (dashed: dense)')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  moe = result['config']['moe']
  norm = TwoSlopeNorm(vmin=0, vcenter=1, vmax=moe['experts'] / moe['top_k'])
  image = None
  for ax, r in zip(axes[1:], moe_runs, strict=True):
    load = np.asarray(r['expert_load'], np.float64)  # (steps, layers, E)
    bins = max(1, len(load) // 50)
    n = len(load) // bins * bins
    binned = load[:n].reshape(-1, bins, *load.shape[1:]).sum(1)
    share = binned / binned.mean(-1, keepdims=True)
    rows = share.reshape(len(share), -1).T  # (layers * E, bins)
    image = ax.imshow(
      rows,
      aspect='auto',
      cmap='RdBu_r',
      norm=norm,
      interpolation='nearest',
      extent=(0, n, rows.shape[0] - 0.5, -0.5),
    )
    e = load.shape[-1]
    for layer in range(1, load.shape[1]):
      ax.axhline(layer * e - 0.5, color='k', lw=0.8)
    ax.set_yticks(range(rows.shape[0]))
    ax.set_yticklabels(
      [f'L{i // e} e{i % e}' for i in range(rows.shape[0])], fontsize=6
    )
    ax.set_xlabel('training step')
    ax.set_title(f'{arms.ARMS[r["arm"]].label}: expert load', fontsize=10)
  if image is not None:
    fig.colorbar(image, ax=list(axes[1:]), label='load / mean load')
  note = 'dots: whole validation split (the table)'
  if any(runs[0]['curve']['val_is_estimate']):
    note = 'earlier points: estimate on a sample spread over the split; ' + note
  fig.supxlabel(note, fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  sys.exit(_cli.run_main('moe_lm.py', main))
