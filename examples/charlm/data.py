"""The corpus of the character-level LM: text, split, batches and windows.

The corpus is any UTF-8 text: the first 90% of its characters train the
model and the last 10% validate it. Without a path, a built-in corpus is used
that every Python installation has: the source of a fixed, sorted list of
standard-library modules (``STDLIB_MODULES``), read from the running
interpreter's own ``Lib`` directory, so it needs no download. Its exact text
depends on the Python version; the run records which files, their size and a
SHA-256 of the text, so results are comparable only for the same digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from typing import Any

import numpy as np
from _cli import UsageError

#: Standard-library modules whose source forms the built-in corpus, sorted.
#: All exist as plain ``.py`` files in CPython 3.10 to 3.14.
STDLIB_MODULES = (
  'argparse.py',
  'ast.py',
  'calendar.py',
  'configparser.py',
  'csv.py',
  'dataclasses.py',
  'difflib.py',
  'enum.py',
  'fractions.py',
  'functools.py',
  'gettext.py',
  'heapq.py',
  'inspect.py',
  'ipaddress.py',
  'logging/__init__.py',
  'os.py',
  'random.py',
  'shutil.py',
  'statistics.py',
  'string.py',
  'subprocess.py',
  'tarfile.py',
  'tempfile.py',
  'textwrap.py',
  'threading.py',
  'tokenize.py',
  'traceback.py',
  'typing.py',
  'unittest/case.py',
  'urllib/parse.py',
)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A character-level corpus split 90/10 into train and validation ids."""

  train: np.ndarray  # int32 ids
  val: np.ndarray
  vocab: str  # sorted characters; id i is vocab[i]
  info: dict[str, Any]  # where the text came from, for the results file


def _stdlib_text() -> tuple[str, dict[str, Any]]:
  lib = os.path.dirname(os.__file__)
  parts, used = [], []
  for name in STDLIB_MODULES:
    path = os.path.join(lib, name)
    try:
      with open(path, encoding='utf-8') as f:
        parts.append(f.read())
    except OSError:
      continue  # a trimmed installation; the digest records what was used
    used.append(name)
  text = ''.join(parts)
  if len(text) < 100_000:
    raise UsageError(
      f'the built-in corpus needs the standard library source in {lib}, which'
      ' is missing here; pass --text PATH to a UTF-8 text file'
    )
  return text, {
    'source': 'python-stdlib',
    'python': sys.version.split()[0],
    'files': used,
  }


def _file_text(path: str) -> tuple[str, dict[str, Any]]:
  if not os.path.exists(path):
    raise UsageError(f'no such file: {path}')
  if os.path.isdir(path):
    raise UsageError(f'{path} is a directory, not a text file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise UsageError(f'cannot read {path}: {e.strerror}') from None
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise UsageError(
      f'{path} is not UTF-8 text (invalid byte at offset {e.start})'
    ) from None
  if not text.strip():
    raise UsageError(f'{path} is empty')
  return text, {'source': 'file', 'path': os.path.abspath(path)}


def load_corpus(
  path: str | None, *, seq_len: int, val_fraction: float = 0.1
) -> Corpus:
  """Reads ``path`` (or the built-in corpus) and splits it 90/10.

  Args:
    path: a UTF-8 text file, or ``None`` for the standard-library corpus.
    seq_len: the model's context length; each split must hold a window.
    val_fraction: the trailing fraction of characters used for validation.

  Returns:
    The corpus, with the vocabulary taken from the whole text.

  Raises:
    UsageError: a missing, unreadable, empty, non-UTF-8 or too short file.
  """
  text, info = _stdlib_text() if path is None else _file_text(path)
  split = int(len(text) * (1 - val_fraction))
  need = math.ceil((seq_len + 1) / val_fraction)
  if len(text) - split < seq_len + 1:
    raise UsageError(
      f'the text has {len(text)} characters; sequence length {seq_len} needs'
      f' at least {need} (10% of it is held out for validation)'
    )
  vocab = ''.join(sorted(set(text)))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  info = {
    **info,
    'characters': len(text),
    'vocab_size': len(vocab),
    'train_characters': split,
    'val_characters': len(text) - split,
    'sha256': hashlib.sha256(text.encode('utf-8')).hexdigest(),
  }
  return Corpus(ids[:split], ids[split:], vocab, info)


def sample_batch(
  ids: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int
) -> np.ndarray:
  """``batch`` random windows of ``seq_len + 1`` ids (inputs and targets)."""
  starts = rng.integers(0, len(ids) - seq_len, size=batch)
  return np.stack([ids[s : s + seq_len + 1] for s in starts])


def eval_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """All non-overlapping windows of ``seq_len + 1`` ids, in order.

  Window ``i`` predicts characters ``i * seq_len + 1`` to
  ``(i + 1) * seq_len``, so together they score every character of the
  split once (except the first, and a tail shorter than a window).
  """
  n = (len(ids) - 1) // seq_len
  idx = np.arange(seq_len + 1)[None, :] + seq_len * np.arange(n)[:, None]
  return ids[idx]


def spread_sample(windows: np.ndarray, count: int) -> np.ndarray:
  """``count`` windows evenly spaced over all of ``windows`` (all if fewer).

  The sample behind the validation curve's intermediate points: it covers
  the whole split, beginning to end, not its first windows.
  """
  if count <= 0 or count >= len(windows):
    return windows
  return windows[np.linspace(0, len(windows) - 1, count).round().astype(int)]


def batches_of(windows: np.ndarray, size: int) -> tuple[np.ndarray, int]:
  """``windows`` in batches of ``size``, the last padded by repeating rows.

  Returns:
    An array ``(num_batches, size, seq_len + 1)`` and the number of real
    windows, so that every window counts once and the padding not at all.
  """
  n = len(windows)
  padded = windows[np.arange(n + (-n) % size) % n]
  return padded.reshape(-1, size, windows.shape[-1]), n
