"""GLU variants of the transformer FFN, compared on a character-level LM.

Shazeer (2020), "GLU Variants Improve Transformer"
(https://arxiv.org/abs/2002.05202), replaced the ReLU feed-forward block of a
transformer with gated linear units and found the gated versions better at
equal parameters and steps. This example repeats the comparison at laptop
scale: a small decoder-only transformer (the ``charlm`` package) trained
once per FFN variant and seed on a character-level corpus, the gated
variants' hidden width cut to 2/3 (rounded up to a multiple of 8) so
parameters match.

Run::

  python examples/glu_variants.py                       # built-in corpus
  python examples/glu_variants.py --text ../shared/data/tinyshakespeare.txt
  python examples/glu_variants.py --steps 200 --variants relu,swiglu  # quick

Shows a progress bar, prints a results table, and writes ``results.json``
and ``val_curves.png`` to ``--out``.
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
from charlm import data, flags, model, train

#: Shazeer (2020), Table 1: T5-base log-perplexity on the C4 validation set
#: after 65,536 pre-training steps (lower is better).
PAPER_LOG_PPL = {
  'relu': 1.997,
  'gelu': 1.983,
  'swish': 1.994,
  'glu': 1.982,
  'bilinear': 1.960,
  'reglu': 1.953,
  'geglu': 1.942,
  'swiglu': 1.944,
}
VARIANT_NAMES = tuple(PAPER_LOG_PPL)


def build_parser() -> argparse.ArgumentParser:
  p = _cli.Parser(
    prog='glu_variants.py',
    description=(
      'Train a small character-level transformer once per FFN variant of'
      ' Shazeer (2020) -- ReLU, GELU, Swish, GLU, Bilinear, ReGLU, GeGLU,'
      ' SwiGLU -- with the gated hidden width cut to 2/3 so parameters match;'
      ' print a table, write results.json and val_curves.png. Data: the'
      ' first 90% of --text trains, the last 10% validates. Without'
      ' --text, the built-in corpus is the source code of 30 standard-'
      'library modules of the running Python, read from its Lib directory'
      ' (argparse.py, ast.py, ..., urllib/parse.py: STDLIB_MODULES in'
      ' examples/charlm/data.py; about 1.6 MB; no download). The default run,'
      ' 8 variants x 600 steps, is sized to finish within 5 minutes on 2 CPU'
      ' cores; --steps, --variants and --seeds shorten or extend it. The'
      ' validation loss in the table is the whole validation split; the'
      ' curve points before the last are an estimate on a sample spread over'
      ' it (--curve-windows).'
    ),
    formatter_class=_cli.HelpFormatter,
  )
  flags.add_common_flags(p)
  p.add_argument(
    '--seeds',
    type=_cli.positive_int,
    default=1,
    help='seeds per variant (0, 1, ..., K-1)',
  )
  p.add_argument(
    '--variants',
    default=','.join(VARIANT_NAMES),
    help='comma-separated subset of the variants',
  )
  p.add_argument(
    '--out',
    default='results/glu_variants',
    help='output directory for results.json and the plot',
  )
  return p


def parse_variants(text: str) -> list[str]:
  names = [v.strip().lower() for v in text.split(',') if v.strip()]
  unknown = [v for v in names if v not in PAPER_LOG_PPL]
  if unknown or not names:
    raise _cli.UsageError(
      f'unknown variant {unknown[0]!r}; choose from {",".join(VARIANT_NAMES)}'
      if unknown
      else '--variants is empty'
    )
  return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  variants = parse_variants(args.variants)

  corpus = data.load_corpus(args.text, seq_len=args.seq_len)
  out_dir = _cli.prepare_out_dir(args.out)
  configs = flags.configs_from_args(args, corpus)
  print(
    f'{args.text or "built-in stdlib corpus"}:'
    f' {corpus.info["characters"]:,} characters, vocabulary'
    f' {corpus.info["vocab_size"]}; {len(variants)} variants x'
    f' {args.seeds} seed(s) x {args.steps} steps',
    flush=True,
  )
  json_path = os.path.join(out_dir, 'results.json')
  result = train_all(args, variants, corpus, configs, json_path)
  print(report(result, args))
  png_path = os.path.join(out_dir, 'val_curves.png')
  plot(
    result['runs'], variants, png_path, args.text or 'built-in stdlib corpus'
  )
  print(f'\nwrote {json_path} and {png_path}')


def train_all(args, variants, corpus, configs, json_path: str) -> dict:
  """Trains every seed and variant; rewrites the JSON after each run.

  Returns:
    The final contents of the results file.
  """
  model_cfg, train_cfg = configs
  runs, result = [], {}
  t_start = time.perf_counter()
  total = len(variants) * args.seeds
  for seed in range(args.seeds):
    for variant in variants:
      desc = f'[{len(runs) + 1}/{total}] {variant} seed {seed}'
      try:
        run = train.fit(
          corpus,
          model_cfg,
          train_cfg,
          variant,
          seed,
          desc=desc,
          progress=not args.no_progress,
        )
      except FloatingPointError as e:
        raise _cli.UsageError(f'{e}; try a lower --lr') from None
      runs.append(run)
      print(
        f'{desc}: val {run["val_bpc"]:.4f} bpc (whole validation split),'
        f' {run["tokens_per_second"] or 0:,.0f} tokens/s',
        flush=True,
      )
      # Written after every run, so an interrupted run keeps what it has.
      result = results_json(
        args,
        variants,
        corpus,
        configs,
        runs,
        time.perf_counter() - t_start,
        complete=len(runs) == total,
      )
      _cli.write_json(json_path, result)
  return result


def results_json(
  args, variants, corpus, configs, runs, wall, *, complete: bool
) -> dict:
  """Everything a run measured, with the settings that produced it."""
  model_cfg, train_cfg = configs
  done = [v for v in variants if any(r['variant'] == v for r in runs)]
  return {
    'experiment': 'glu_variants',
    'complete': complete,
    'config': {
      'model': vars(model_cfg),
      'train': vars(train_cfg),
      'seeds': list(range(args.seeds)),
      'variants': variants,
    },
    **train.run_info(corpus, runs, wall),
    'paper_log_ppl': PAPER_LOG_PPL,
    'summary': summarise(runs, done),
    'runs': runs,
  }


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
  """Per-variant means and spreads over seeds, and each variant's rank."""
  return _results.summarise(
    runs,
    variants,
    key='variant',
    rank_by='val_bpc',
    row=lambda v, rs: {
      'variant': v,
      'gated': model.VARIANTS[v][0],
      'params': rs[0]['params'],
      'ffn_hidden': rs[0]['ffn_hidden'],
      **_results.lm_stats(rs, spread=True),
      'seeds': len(rs),
      'paper_log_ppl': PAPER_LOG_PPL[v],
    },
  )


def report(result: dict, args) -> str:
  """The results table (Markdown) and a one-line setting summary."""
  return _results.lm_report(
    result,
    args,
    [
      _results.RANK,
      ('variant', lambda s: model.DISPLAY[s['variant']]),
      ('params', lambda s: f'{s["params"]:,}'),
      _results.FFN_HIDDEN,
      _results.TRAIN_BPC,
      _results.VAL_BPC,
      _results.TOKENS_PER_SECOND,
      ('paper log-ppl', lambda s: f'{s["paper_log_ppl"]:.3f}'),
    ],
  )


def plot(runs: list[dict], variants: list[str], path: str, source: str):
  """Validation bits per character against steps, one line per variant.

  The last point of each line (a dot) is the whole validation split, the
  table's number; the points before it are the curve's estimate, when the
  run used one, and the figure says so.
  """
  plt = _cli.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.8))
  for v in variants:
    rs = [r for r in runs if r['variant'] == v]
    steps = rs[0]['curve']['step']
    val = np.array([r['curve']['val_bpc'] for r in rs])
    style = '-' if model.VARIANTS[v][0] else '--'
    (line,) = ax.plot(steps, val.mean(0), style, label=v)
    ax.plot(steps[-1], val.mean(0)[-1], 'o', color=line.get_color(), ms=4)
    if len(rs) > 1:
      ax.fill_between(
        steps, val.min(0), val.max(0), alpha=0.15, color=line.get_color()
      )
  ax.set_xlabel('training step')
  ax.set_ylabel('validation loss (bits per character)')
  lo = min(min(r['curve']['val_bpc']) for r in runs)
  hi = max(r['curve']['val_bpc'][len(r['curve']['val_bpc']) // 4] for r in runs)
  if hi > lo:
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax.set_title(
    f'FFN variants on {os.path.basename(source)} (dashed: not gated)'
  )
  curve = runs[0]['curve']
  note = 'dots: whole validation split (the table)'
  if any(curve['val_is_estimate']):
    note = (
      f'earlier points: estimate on {curve["curve_windows"]:,} of'
      f' {curve["val_windows"]:,} windows spread over the split; ' + note
    )
  fig.text(0.5, 0.01, note, ha='center', va='bottom', fontsize=8)
  ax.legend(ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  sys.exit(_cli.run_main('glu_variants.py', main))
