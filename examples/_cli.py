"""Command-line plumbing shared by the examples.

One-line errors instead of tracebacks for bad arguments, positive-integer
argument types, the results table, and writing JSON and PNG results. Nothing
here imports JAX, so a script can parse its arguments (and, for example, set
``XLA_FLAGS``) before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


class UsageError(Exception):
  """A bad argument or input, reported as one line without a traceback."""


class CheckFailed(Exception):
  """A result that failed its own check (exit status 1, one line)."""


class Parser(argparse.ArgumentParser):
  """An ``ArgumentParser`` whose errors are a single line on stderr."""

  def error(self, message: str) -> NoReturn:
    """Prints ``prog: error: message`` and exits with status 2."""
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults in ``--help``, except unset (``None``) and flags."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def positive_int(text: str) -> int:
  """An ``argparse`` type: an integer of at least 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
  return value


def nonnegative_int(text: str) -> int:
  """An ``argparse`` type: an integer of at least 0."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be at least 0, got {value}')
  return value


def nonnegative_float(text: str) -> float:
  """An ``argparse`` type: a finite float of at least 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not value >= 0.0 or value == float('inf'):
    raise argparse.ArgumentTypeError(f'must be finite and >= 0, got {text}')
  return value


def run_main(prog: str, main, argv: Sequence[str] | None = None) -> int:
  """Runs ``main(argv)``, turning ``UsageError`` into a one-line message."""
  try:
    main(argv)
  except UsageError as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  except CheckFailed as e:
    print(f'{prog}: check failed: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'{prog}: interrupted', file=sys.stderr)
    return 130
  return 0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured Markdown table; numbers right-aligned."""
  cells = [[str(c) for c in row] for row in rows]
  widths = [
    max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)
  ]
  numeric = [
    all(_is_number(r[i]) for r in cells) if cells else False
    for i in range(len(headers))
  ]

  def line(values):
    padded = [
      v.rjust(w) if num else v.ljust(w)
      for v, w, num in zip(values, widths, numeric, strict=True)
    ]
    return '| ' + ' | '.join(padded) + ' |'

  rule = (
    '|'
    + '|'.join(
      ('-' * (w + 1) + ':') if num else ('-' * (w + 2))
      for w, num in zip(widths, numeric, strict=True)
    )
    + '|'
  )
  return '\n'.join([line(headers), rule] + [line(r) for r in cells])


def _is_number(text: str) -> bool:
  head = text.split(' ')[0].replace(',', '').rstrip('%')
  try:
    float(head)
  except ValueError:
    return False
  return True


def prepare_out_dir(path: str) -> str:
  """Creates the output directory, or raises ``UsageError``."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f'cannot create output directory {path!r}: {e}') from None
  return path


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON (atomically: temp file, then rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write('\n')
  os.replace(tmp, path)


def pyplot():
  """``matplotlib.pyplot`` with a non-interactive backend (files only)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt
