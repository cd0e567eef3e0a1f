"""A small character-level language model built with flaxact's NNX layers.

The shared core of ``glu_variants.py`` (one training run per FFN variant) and
``sharded_training.py`` (the same model on a device mesh): the corpus, the
decoder-only transformer, the FFN variants of Shazeer (2020), and a training
loop with a jit-compiled step and optax AdamW (linear warmup, cosine decay).

The corpus is any UTF-8 text: the first 90% of its characters train the
model and the last 10% validate it. Without a path, a built-in corpus is used
that every Python installation has: the source of a fixed, sorted list of
standard-library modules (``STDLIB_MODULES``), read from the running
interpreter's own ``Lib`` directory, so it needs no download. Its exact text
depends on the Python version; the run records which files, their size and a
SHA-256 of the text, so results are comparable only for the same digest.

Every parameter carries logical axis names (MaxText / T5X convention:
``embed``, ``mlp``, ``heads``, ``vocab``), so a mesh and a rule set are all a
sharded run adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import _cli
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import UsageError
from flax import nnx
from tqdm.auto import tqdm

import flaxact
from flaxact import nnx as fnnx

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

#: The FFN variants of Shazeer (2020), "GLU Variants Improve Transformer",
#: in the paper's table order: name -> (gated, activation).
VARIANTS: dict[str, tuple[bool, Callable[[jax.Array], jax.Array]]] = {
  'relu': (False, flaxact.relu),
  'gelu': (False, flaxact.gelu),
  'swish': (False, flaxact.silu),
  'glu': (True, flaxact.sigmoid),
  'bilinear': (True, flaxact.identity),
  'reglu': (True, flaxact.relu),
  'geglu': (True, flaxact.gelu),
  'swiglu': (True, flaxact.silu),
}

#: Display names, as in the paper's table.
DISPLAY = {
  'relu': 'FFN_ReLU',
  'gelu': 'FFN_GELU',
  'swish': 'FFN_Swish',
  'glu': 'FFN_GLU',
  'bilinear': 'FFN_Bilinear',
  'reglu': 'FFN_ReGLU',
  'geglu': 'FFN_GEGLU',
  'swiglu': 'FFN_SwiGLU',
}


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------


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
  """All non-overlapping windows of ``seq_len + 1`` ids, in order."""
  n = (len(ids) - 1) // seq_len
  idx = np.arange(seq_len + 1)[None, :] + seq_len * np.arange(n)[:, None]
  return ids[idx]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the transformer."""

  vocab_size: int
  d_model: int = 128
  layers: int = 2
  heads: int = 4
  seq_len: int = 128


def hidden_features(d_model: int, gated: bool) -> int:
  """FFN width: ``4 * d_model``, times 2/3 when gated (rounded up to 8)."""
  return flaxact.ffn_hidden_features(d_model, gated=gated, multiple_of=8)


def _names(*names: str | None) -> dict[str, Any]:
  return {'out_sharding': names}


def make_ffn(variant: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The FFN of ``variant`` (a key of ``VARIANTS``), without biases."""
  gated, act = VARIANTS[variant]
  hidden = hidden_features(d_model, gated)
  if not gated:
    return fnnx.FFN(d_model, hidden, activation=act, use_bias=False, rngs=rngs)
  return fnnx.GatedFFN(
    d_model, hidden, activation=act, use_bias=False, rngs=rngs
  )


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention."""

  def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads

    def proj(names):
      return nnx.Linear(
        d_model,
        d_model,
        use_bias=False,
        kernel_metadata=_names(*names),
        rngs=rngs,
      )

    self.query = proj(('embed', 'heads'))
    self.key = proj(('embed', 'heads'))
    self.value = proj(('embed', 'heads'))
    self.out = proj(('heads', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends over ``x`` of shape ``(batch, time, d_model)``."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    y = jax.nn.dot_product_attention(
      split(self.query(x)),
      split(self.key(x)),
      split(self.value(x)),
      is_causal=True,
    )
    return self.out(y.reshape(b, t, d))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: attention, then the FFN under test."""

  def __init__(self, cfg: ModelConfig, variant: str, *, rngs: nnx.Rngs):
    norm = lambda: nnx.LayerNorm(
      cfg.d_model,
      scale_metadata=_names('embed'),
      bias_metadata=_names('embed'),
      rngs=rngs,
    )
    self.norm1 = norm()
    self.attn = CausalSelfAttention(cfg.d_model, cfg.heads, rngs=rngs)
    self.norm2 = norm()
    self.ffn = make_ffn(variant, cfg.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``(batch, time, d_model)`` to the same shape."""
    x = x + self.attn(self.norm1(x))
    return x + self.ffn(self.norm2(x))


class CharLM(nnx.Module):
  """Decoder-only transformer over characters, learned positions."""

  def __init__(self, cfg: ModelConfig, variant: str, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=init,
      embedding_metadata=_names('vocab', 'embed'),
      rngs=rngs,
    )
    self.pos = nnx.Embed(
      cfg.seq_len,
      cfg.d_model,
      embedding_init=init,
      embedding_metadata=_names(None, 'embed'),
      rngs=rngs,
    )
    self.blocks = nnx.List(
      [Block(cfg, variant, rngs=rngs) for _ in range(cfg.layers)]
    )
    self.norm = nnx.LayerNorm(
      cfg.d_model,
      scale_metadata=_names('embed'),
      bias_metadata=_names('embed'),
      rngs=rngs,
    )
    self.head = nnx.Linear(
      cfg.d_model,
      cfg.vocab_size,
      use_bias=False,
      kernel_metadata=_names('embed', 'vocab'),
      rngs=rngs,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, vocab)`` for ids ``(batch, time)``."""
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))[None]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def build_model(cfg: ModelConfig, variant: str, seed: int) -> CharLM:
  """The model with initial weights from ``seed``; no mesh needed."""
  with nnx.use_eager_sharding(False):
    return CharLM(cfg, variant, rngs=nnx.Rngs(seed))


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings (AdamW, linear warmup then cosine decay)."""

  steps: int = 1000
  batch_size: int = 16
  lr: float = 3e-3
  warmup: int = 50
  weight_decay: float = 0.1
  eval_every: int = 100
  eval_batches: int = 8  # batches of validation windows per curve point


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with warmup and cosine decay to 10% of the peak; clipping at 1."""
  # A warmup as long as the run is capped so that some decay remains.
  warmup = min(cfg.warmup, cfg.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, warmup, cfg.steps, end_value=cfg.lr / 10
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      schedule,
      b1=0.9,
      b2=0.99,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    ),
  )


def loss_fn(graphdef, params, batch: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy in nats."""
  model = nnx.merge(graphdef, params)
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean()


def make_steps(graphdef, tx: optax.GradientTransformation):
  """Pure ``train_step`` and ``eval_step`` functions, ready for ``jax.jit``."""

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(
      graphdef, params, batch
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_step(params, batch):
    return loss_fn(graphdef, params, batch)

  return train_step, eval_step


@dataclasses.dataclass
class Placement:
  """How to lay a run out on devices; without one, JAX's default device.

  ``place(params)`` returns the parameters placed on the devices, their
  shardings, and the sharding of a batch of token ids. The optimiser state
  follows the parameters' layout.
  """

  place: Callable[[Any], tuple[Any, Any, Any]]


def fit(
  corpus: Corpus,
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  variant: str,
  seed: int,
  *,
  placement: Placement | None = None,
  desc: str | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains one model and returns its curves and final numbers.

  Args:
    corpus: the data.
    model_cfg: the transformer's shape.
    train_cfg: the optimisation settings.
    variant: a key of ``VARIANTS``.
    seed: seeds both the initial weights and the order of the batches.
    placement: device layout; ``None`` runs on the default device.
    desc: the progress bar's label.
    progress: show a progress bar on stderr.

  Returns:
    A dict of plain Python values (JSON-ready): parameter counts, the train
    loss and validation curves in bits per character, the final validation
    loss on the whole validation split, and training throughput.
  """
  model = build_model(model_cfg, variant, seed)
  graphdef, params = nnx.split(model, nnx.Param)
  ffn_params = count_params(nnx.state(model.blocks[0].ffn, nnx.Param))
  tx = make_optimizer(train_cfg)
  train_step, eval_step = make_steps(graphdef, tx)

  batch_sharding = None
  if placement is None:
    opt_state = tx.init(params)
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    eval_step = jax.jit(eval_step)
  else:
    params, p_sh, batch_sharding = placement.place(params)
    opt_state = jax.jit(tx.init)(params)  # moments laid out like params
    o_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    train_step = jax.jit(
      train_step,
      in_shardings=(p_sh, o_sh, batch_sharding),
      out_shardings=(p_sh, o_sh, None),
      donate_argnums=(0, 1),
    )
    eval_step = jax.jit(eval_step, in_shardings=(p_sh, batch_sharding))

  put = (
    (lambda b: jax.device_put(b, batch_sharding))
    if batch_sharding is not None
    else jnp.asarray
  )
  bs, t = train_cfg.batch_size, model_cfg.seq_len
  windows = eval_windows(corpus.val, t)
  n_eval = (len(windows) // bs) * bs or len(windows)
  eval_sets = [put(windows[i : i + bs]) for i in range(0, n_eval, bs)]
  curve_sets = eval_sets[: train_cfg.eval_batches]

  def evaluate(sets) -> float:
    # One batch at a time: independent programs with collectives in flight
    # together can deadlock XLA:CPU's simulated devices on few cores.
    values = [float(eval_step(params, b)) for b in sets]
    return float(np.mean(values)) / math.log(2)

  rng = np.random.default_rng(seed)
  steps = train_cfg.steps
  curve_steps, curve_val, curve_train = [], [], []
  losses: list[float] = []  # every step's training loss, nats
  pending: list[jax.Array] = []
  train_seconds, timed_steps = 0.0, 0
  bar = tqdm(
    total=steps,
    desc=desc or variant,
    unit='step',
    file=sys.stderr,
    disable=not progress,
    leave=False,
    dynamic_ncols=True,
  )
  step = 0
  while step < steps:
    # The first step compiles; time the rest.
    chunk = (
      1
      if step == 0
      else min(train_cfg.eval_every, steps) - (step % train_cfg.eval_every)
    )
    chunk = min(chunk, steps - step)
    t0 = time.perf_counter()
    for _ in range(chunk):
      batch = put(sample_batch(corpus.train, rng, bs, t))
      params, opt_state, loss = train_step(params, opt_state, batch)
      pending.append(loss)
    jax.block_until_ready(pending[-1])
    if step > 0:
      train_seconds += time.perf_counter() - t0
      timed_steps += chunk
    step += chunk
    bar.update(chunk)
    if step % train_cfg.eval_every == 0 or step == steps:
      new = [float(x) for x in jax.device_get(pending)]
      losses.extend(new)
      pending = []
      train_bpc = float(np.mean(new)) / math.log(2)
      val_bpc = evaluate(curve_sets)
      curve_steps.append(step)
      curve_train.append(train_bpc)
      curve_val.append(val_bpc)
      bar.set_postfix(train=f'{train_bpc:.3f}', val=f'{val_bpc:.3f}')
  bar.close()

  final_val = evaluate(eval_sets)
  if not math.isfinite(final_val):
    raise FloatingPointError(f'{variant} seed {seed}: the loss diverged')
  return {
    'variant': variant,
    'seed': seed,
    'params': count_params(params),
    'ffn_params_per_layer': ffn_params,
    'ffn_hidden': hidden_features(model_cfg.d_model, VARIANTS[variant][0]),
    'final_train_bpc': curve_train[-1],
    'val_bpc': final_val,
    'val_tokens': len(eval_sets) * bs * t,
    'tokens_per_second': (
      timed_steps * bs * t / train_seconds if train_seconds else None
    ),
    'curve': {
      'step': curve_steps,
      'train_bpc': curve_train,
      'val_bpc': curve_val,
    },
    'train_loss_per_step': losses,
  }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, *, steps: int) -> None:
  """Adds the corpus, model and optimiser options shared by the examples."""
  p.add_argument(
    '--text',
    metavar='PATH',
    default=None,
    help='UTF-8 text file to train on (default: the built-in corpus of'
    ' standard-library source)',
  )
  p.add_argument(
    '--steps',
    type=_cli.positive_int,
    default=steps,
    help='training steps per run',
  )
  p.add_argument(
    '--d-model', type=_cli.positive_int, default=128, help='model width'
  )
  p.add_argument(
    '--layers', type=_cli.positive_int, default=2, help='transformer blocks'
  )
  p.add_argument(
    '--heads', type=_cli.positive_int, default=4, help='attention heads'
  )
  p.add_argument(
    '--seq-len',
    type=_cli.positive_int,
    default=128,
    help='context length in characters',
  )
  p.add_argument(
    '--batch-size',
    type=_cli.positive_int,
    default=16,
    help='sequences per step',
  )
  p.add_argument(
    '--lr',
    type=_cli.nonnegative_float,
    default=3e-3,
    help='peak AdamW learning rate',
  )
  p.add_argument(
    '--warmup',
    type=_cli.nonnegative_int,
    default=50,
    help='linear warmup steps, then cosine decay to lr/10',
  )
  p.add_argument(
    '--weight-decay',
    type=_cli.nonnegative_float,
    default=0.1,
    help='AdamW weight decay (matrices only)',
  )
  p.add_argument(
    '--eval-every',
    type=_cli.positive_int,
    default=100,
    help='steps between points of the validation curve',
  )
  p.add_argument(
    '--no-progress', action='store_true', help='hide the progress bar'
  )


def configs_from_args(
  args: argparse.Namespace, corpus: Corpus
) -> tuple[ModelConfig, TrainConfig]:
  """The model and training configurations that ``add_arguments`` parsed."""
  if args.d_model % args.heads:
    raise UsageError(
      f'--d-model {args.d_model} is not divisible by --heads {args.heads}'
    )
  model_cfg = ModelConfig(
    vocab_size=len(corpus.vocab),
    d_model=args.d_model,
    layers=args.layers,
    heads=args.heads,
    seq_len=args.seq_len,
  )
  train_cfg = TrainConfig(
    steps=args.steps,
    batch_size=args.batch_size,
    lr=args.lr,
    warmup=args.warmup,
    weight_decay=args.weight_decay,
    eval_every=args.eval_every,
  )
  return model_cfg, train_cfg
