"""Command-line flags shared by the scripts that train the character LM.

The model and training flags are derived from ``model.ModelConfig`` and
``train.TrainConfig`` (``_cli.add_flags``): each default, type and help text
is written once, in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses

import _cli

from charlm import data, model, train


def add_common_flags(p: argparse.ArgumentParser, **defaults) -> None:
  """``--text``, the model and training flags, and ``--no-progress``.

  The model and training flags come from ``model.ModelConfig`` and
  ``train.TrainConfig`` (their defaults, types and help); ``defaults``
  replaces some of them for one script.
  """
  p.add_argument(
    '--text',
    metavar='PATH',
    default=None,
    help='UTF-8 text file to train on (default: the built-in corpus of'
    ' standard-library source)',
  )
  model_names = {f.name for f in dataclasses.fields(model.ModelConfig)}
  _cli.add_flags(
    p,
    model.ModelConfig,
    defaults={k: v for k, v in defaults.items() if k in model_names},
  )
  _cli.add_flags(
    p,
    train.TrainConfig,
    defaults={k: v for k, v in defaults.items() if k not in model_names},
  )
  p.add_argument(
    '--no-progress', action='store_true', help='hide the progress bar'
  )


def configs_from_args(
  args: argparse.Namespace, corpus: data.Corpus
) -> tuple[model.ModelConfig, train.TrainConfig]:
  """The model and training configurations of the parsed flags."""
  if args.d_model % args.heads:
    raise _cli.UsageError(
      f'--d-model {args.d_model} is not divisible by --heads {args.heads}'
    )
  model_cfg = _cli.from_args(
    model.ModelConfig, args, vocab_size=len(corpus.vocab)
  )
  return model_cfg, _cli.from_args(train.TrainConfig, args)
