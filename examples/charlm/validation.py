"""The validation loss of the character-level LM, and the curve's estimate.

The validation loss has one definition everywhere a run reports it: the mean
next-character loss, in bits per character, over every non-overlapping
window of the validation split (``Validator.whole_split``). A learning curve
may use a cheaper estimate for its intermediate points: the same mean over a
fixed sample of windows spread evenly from the first to the last character
of the split (``Validator.curve_point``), never its first windows alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from charlm import data


class Validator:
  """Validation loss in bits per character, on the whole split or a sample.

  Both are means over non-overlapping windows of the validation split
  (every window counted once, in batches of the training batch size); the
  sample is ``curve_windows`` of them spread evenly from its first to its
  last character.
  """

  def __init__(
    self, val_ids, seq_len: int, *, batch_size: int, curve_windows: int, put
  ) -> None:
    windows = data.eval_windows(val_ids, seq_len)
    sample = data.spread_sample(windows, curve_windows)
    self.windows, self.sample_windows = len(windows), len(sample)
    self.estimate = len(sample) < len(windows)
    self._whole = self._batches(windows, batch_size, put)
    self._sample = self._batches(sample, batch_size, put)

  @staticmethod
  def _batches(windows, size, put):
    batches, n = data.batches_of(windows, size)
    return [put(b) for b in batches], n

  @staticmethod
  def _loss(eval_step, params, batches) -> float:
    # One batch at a time: independent programs with collectives in flight
    # together can deadlock XLA:CPU's simulated devices on few cores.
    device_batches, n = batches
    per_window = np.concatenate(
      [np.asarray(eval_step(params, b)) for b in device_batches]
    )[:n]
    return float(per_window.mean()) / math.log(2)

  def whole_split(self, eval_step, params) -> float:
    """The validation loss: every window of the split."""
    return self._loss(eval_step, params, self._whole)

  def curve_point(self, eval_step, params) -> float:
    """The sample's loss (the whole split's when the sample is all of it)."""
    return self._loss(eval_step, params, self._sample)

  def describe(self) -> dict[str, Any]:
    """What the curve's points are, for the results file."""
    return {
      'val_windows': self.windows,
      'curve_windows': self.sample_windows,
      'intermediate_points': (
        f'estimate: {self.sample_windows} of the {self.windows} windows,'
        ' evenly spaced over the whole validation split'
        if self.estimate
        else 'the whole validation split'
      ),
      'last_point': 'the whole validation split (equals val_bpc)',
    }
