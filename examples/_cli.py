"""Command-line plumbing shared by the examples.

One-line errors instead of tracebacks for bad arguments, positive-integer
argument types, command-line flags derived from configuration dataclasses,
the results table, and writing JSON and PNG results. Nothing here imports
JAX, so a script can parse its arguments (and, for example, set
``XLA_FLAGS``) before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
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


def option(default: Any, help: str, *, minimum: int = 1) -> Any:
  """A configuration field that ``add_flags`` turns into a flag.

  Args:
    default: the field's default, shown by ``--help``.
    help: one line for ``--help``.
    minimum: for ``int`` fields, the smallest value the flag accepts (1 or
      0); ``float`` fields always accept any finite value >= 0.

  Returns:
    A ``dataclasses.field`` carrying ``help`` and ``minimum`` as metadata.
  """
  return dataclasses.field(
    default=default, metadata={'help': help, 'minimum': minimum}
  )


def _flag_type(kind: Any, minimum: int):
  if kind is int:
    return positive_int if minimum >= 1 else nonnegative_int
  if kind is float:
    return nonnegative_float
  raise TypeError(f'no flag type for a {kind!r} field')


def add_flags(
  parser: argparse.ArgumentParser,
  config_class: type,
  *,
  defaults: Mapping[str, Any] | None = None,
) -> None:
  """Adds one ``--flag-name`` per ``option`` field of ``config_class``.

  The flag's type, default and help come from the field, so a default is
  written once, in the dataclass. Fields made without ``option`` (those
  that come from the data, such as the vocabulary size) get no flag.

  Args:
    parser: the parser to extend.
    config_class: a dataclass whose fields were made with ``option``.
    defaults: per-script defaults that replace the dataclass's.
  """
  defaults = dict(defaults or {})
  hints = typing.get_type_hints(config_class)
  for field in dataclasses.fields(config_class):
    if 'help' not in field.metadata:
      continue
    parser.add_argument(
      '--' + field.name.replace('_', '-'),
      dest=field.name,
      type=_flag_type(hints[field.name], field.metadata['minimum']),
      default=defaults.pop(field.name, field.default),
      help=field.metadata['help'],
    )
  if defaults:
    raise TypeError(f'{config_class.__name__} has no flag {sorted(defaults)}')


def from_args(config_class: type, args: argparse.Namespace, **fixed: Any):
  """``config_class`` from the flags ``add_flags`` added, plus ``fixed``."""
  values = {
    f.name: getattr(args, f.name)
    for f in dataclasses.fields(config_class)
    if 'help' in f.metadata
  }
  return config_class(**values, **fixed)


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
