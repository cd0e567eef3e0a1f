"""Summaries over seeds and the results tables, shared by the examples.

An example trains every arm (an FFN variant, an activation, an MoE setting)
once per seed; :func:`summarise` turns the runs into one row per arm,
:func:`table` prints rows as a Markdown table given its columns, and
:func:`lm_report` is the character-level LM examples' setting line and
table. Nothing here imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _cli
import numpy as np

#: A table column: its header, and its cell from a summary row.
Column = tuple[str, Callable[[dict], Any]]


def summarise(
  runs: list[dict],
  names: Sequence[str],
  *,
  key: str,
  row: Callable[[str, list[dict]], dict],
  rank_by: str | None = None,
) -> list[dict]:
  """One summary row per arm, in the order of ``names``.

  Args:
    runs: every run; ``run[key]`` names its arm.
    names: the arms to summarise.
    key: the runs' field that names the arm.
    row: the row of one arm, from its name and its runs (one per seed).
    rank_by: with it, each row also gets ``'rank'``: 1 for the lowest
      ``row[rank_by]``.

  Returns:
    The rows.
  """
  rows = [row(name, [r for r in runs if r[key] == name]) for name in names]
  if rank_by is not None:
    order = sorted(range(len(rows)), key=lambda i: rows[i][rank_by])
    for rank, i in enumerate(order, 1):
      rows[i]['rank'] = rank
  return rows


def lm_stats(runs: list[dict], *, spread: bool = False) -> dict:
  """A character-level LM arm's figures over its seeds' runs.

  Args:
    runs: the arm's runs, one per seed.
    spread: also the lowest and highest validation loss.

  Returns:
    Mean final training loss and mean validation loss (bits per character),
    the validation loss's standard deviation over seeds (``None`` for one
    seed), with ``spread`` its minimum and maximum, and the median tokens
    per second.
  """
  val = np.array([r['val_bpc'] for r in runs])
  stats = {
    'final_train_bpc': float(np.mean([r['final_train_bpc'] for r in runs])),
    'val_bpc': float(val.mean()),
    'val_bpc_std': float(val.std(ddof=1)) if len(val) > 1 else None,
  }
  if spread:
    stats['val_bpc_min'] = float(val.min())
    stats['val_bpc_max'] = float(val.max())
  stats['tokens_per_second'] = float(
    np.median([r['tokens_per_second'] or 0 for r in runs])
  )
  return stats


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
  """``rows`` as a Markdown table (``_cli.format_table``)."""
  return _cli.format_table(
    [header for header, _ in columns],
    [tuple(cell(row) for _, cell in columns) for row in rows],
  )


def _val_cell(s: dict) -> str:
  val = f'{s["val_bpc"]:.4f}'
  if s['val_bpc_std'] is not None:
    val += f' ± {s["val_bpc_std"]:.4f}'
  return val


# The columns of :func:`lm_stats` figures (and ``summarise``'s rank).
RANK: Column = ('rank', lambda s: s['rank'])
FFN_HIDDEN: Column = ('FFN hidden', lambda s: s['ffn_hidden'])
TRAIN_BPC: Column = (
  'train loss (bpc)',
  lambda s: f'{s["final_train_bpc"]:.4f}',
)
VAL_BPC: Column = ('val loss (bpc)', _val_cell)
TOKENS_PER_SECOND: Column = (
  'tokens/s',
  lambda s: f'{s["tokens_per_second"]:,.0f}',
)


def lm_report(
  result: dict,
  args,
  columns: Sequence[Column],
  *,
  setting: str = '',
  note: str = '',
) -> str:
  """A character-level LM example's results: a setting line and the table.

  Args:
    result: the results file's contents (``summary``, ``runs``,
      ``wall_seconds``).
    args: the parsed command line (``charlm.flags``' common flags).
    columns: the table's columns.
    setting: the example's own settings, written after the common ones
      (ending ``'; '``).
    note: what the line says last, after how validation loss is measured.

  Returns:
    The line and the Markdown table.
  """
  seeds = f'{args.seeds} seed' + ('s (mean ± std)' if args.seeds > 1 else '')
  head = (
    f'\nd_model {args.d_model}, {args.layers} layers, {args.heads} heads,'
    f' sequence {args.seq_len}, batch {args.batch_size}, {args.steps} steps,'
    f' AdamW lr {args.lr:g}, {seeds}; {setting}'
    f'{result["wall_seconds"]:.0f} s in all. val loss: the whole validation'
    f' split ({result["runs"][0]["val_tokens"]:,} characters){note}\n'
  )
  return head + '\n' + table(result['summary'], columns)
