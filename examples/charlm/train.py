"""Training the character-level LM: optimiser, jit-compiled step, validation.

``fit`` trains one model and returns its curves and final numbers. The
validation loss has one definition everywhere it is reported: the mean
next-character loss, in bits per character, over every non-overlapping
window of the validation split (``Validator.whole_split``). Evaluating that
at every point of the learning curve would cost more than the training on
a CPU, so the curve's intermediate points are an *estimate* on a fixed
sample of windows spread evenly over the whole split
(``TrainConfig.curve_windows``; 0 evaluates the whole split every time),
and the curve's last point is the whole split, the same number as
``val_bpc``. The results say which points are estimates.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import option
from flax import nnx
from tqdm.auto import tqdm

import flaxact
from charlm import data, model
from charlm.validation import Validator

#: Training-loss steps averaged into ``final_train_bpc``.
FINAL_TRAIN_STEPS = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and evaluation settings (each is a command-line flag)."""

  steps: int = option(600, 'training steps per run')
  batch_size: int = option(16, 'sequences per step')
  lr: float = option(3e-3, 'peak AdamW learning rate')
  warmup: int = option(
    50, 'linear warmup steps, then cosine decay to lr/10', minimum=0
  )
  weight_decay: float = option(0.1, 'AdamW weight decay (matrices only)')
  eval_every: int = option(100, 'steps between points of the validation curve')
  curve_windows: int = option(
    256,
    'validation windows, spread over the whole split, behind each'
    ' intermediate curve point (an estimate); the last point always uses the'
    ' whole split; 0: the whole split at every point',
    minimum=0,
  )


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


def window_losses(graphdef, params, batch: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy of each window, in nats: ``(batch,)``."""
  logits = nnx.merge(graphdef, params)(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean(-1)


def make_steps(graphdef, tx: optax.GradientTransformation):
  """Pure ``train_step`` and ``eval_step`` functions, ready for ``jax.jit``."""

  def loss_fn(params, batch):
    return window_losses(graphdef, params, batch).mean()

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_step(params, batch):
    return window_losses(graphdef, params, batch)

  return train_step, eval_step


@dataclasses.dataclass
class Placement:
  """How to lay a run out on devices; without one, JAX's default device.

  ``place(params)`` returns the parameters placed on the devices, their
  shardings, and the sharding of a batch of token ids. The optimiser state
  follows the parameters' layout.
  """

  place: Callable[[Any], tuple[Any, Any, Any]]


@dataclasses.dataclass
class Compiled:
  """A run's state and its jit-compiled functions."""

  params: Any
  opt_state: Any
  train_step: Callable
  eval_step: Callable
  put: Callable[[np.ndarray], jax.Array]  # host batch -> device batch


def compile_run(graphdef, params, tx, placement: Placement | None) -> Compiled:
  """Jit-compiles the steps, on the default device or by ``placement``."""
  train_step, eval_step = make_steps(graphdef, tx)
  if placement is None:
    return Compiled(
      params,
      tx.init(params),
      jax.jit(train_step, donate_argnums=(0, 1)),
      jax.jit(eval_step),
      jnp.asarray,
    )
  params, p_sh, batch_sh = placement.place(params)
  opt_state = jax.jit(tx.init)(params)  # moments laid out like params
  o_sh = jax.tree.map(lambda x: x.sharding, opt_state)
  sharded_step = jax.jit(
    train_step,
    in_shardings=(p_sh, o_sh, batch_sh),
    out_shardings=(p_sh, o_sh, None),
    donate_argnums=(0, 1),
  )

  def one_step_at_a_time(*args):
    # One step in flight at a time: on few, busy cores XLA:CPU's simulated
    # devices timed out in a collective rendezvous (all-gather and
    # collective-permute) with steps dispatched ahead. Cheap on real devices.
    return jax.block_until_ready(sharded_step(*args))

  return Compiled(
    params,
    opt_state,
    one_step_at_a_time,
    jax.jit(eval_step, in_shardings=(p_sh, batch_sh)),
    lambda b: jax.device_put(b, batch_sh),
  )


def _progress(total: int, desc: str, enabled: bool):
  return tqdm(
    total=total,
    desc=desc,
    unit='step',
    file=sys.stderr,
    disable=not enabled,
    leave=False,
    dynamic_ncols=True,
  )


def _next_stop(step: int, cfg: TrainConfig) -> int:
  """The step after which the loop next stops (to time or to evaluate)."""
  if step == 0:
    return 1  # the first step compiles: time it on its own
  return min((step // cfg.eval_every + 1) * cfg.eval_every, cfg.steps)


def train_loop(
  run: Compiled,
  validator: Validator,
  train_ids: np.ndarray,
  cfg: TrainConfig,
  *,
  seq_len: int,
  seed: int,
  bar,
) -> dict[str, Any]:
  """Runs ``cfg.steps`` steps, evaluating every ``cfg.eval_every``.

  Returns:
    The curve (steps, train and validation bits per character, which
    validation points are estimates), every step's training loss in nats,
    the final whole-split validation loss, and seconds spent compiling (the
    first step), training and evaluating.
  """
  rng = np.random.default_rng(seed)
  curve = {'step': [], 'train_bpc': [], 'val_bpc': [], 'val_is_estimate': []}
  losses: list[float] = []
  seconds = {'first_step': 0.0, 'train': 0.0, 'eval': 0.0}
  step = 0
  while step < cfg.steps:
    stop = _next_stop(step, cfg)
    t0 = time.perf_counter()
    pending = []
    for _ in range(stop - step):
      ids = data.sample_batch(train_ids, rng, cfg.batch_size, seq_len)
      batch = run.put(ids)
      run.params, run.opt_state, loss = run.train_step(
        run.params, run.opt_state, batch
      )
      pending.append(loss)
    losses.extend(float(x) for x in jax.device_get(pending))
    seconds['first_step' if step == 0 else 'train'] += time.perf_counter() - t0
    bar.update(stop - step)
    step = stop
    if step % cfg.eval_every and step != cfg.steps:
      continue
    t0 = time.perf_counter()
    last = step == cfg.steps
    evaluate = validator.whole_split if last else validator.curve_point
    val = evaluate(run.eval_step, run.params)
    seconds['eval'] += time.perf_counter() - t0
    estimate = validator.estimate and not last
    previous = curve['step'][-1] if curve['step'] else 0
    curve['step'].append(step)
    train_nats = float(np.mean(losses[previous:step]))
    curve['train_bpc'].append(train_nats / math.log(2))
    curve['val_bpc'].append(val)
    curve['val_is_estimate'].append(estimate)
    bar.set_postfix_str(
      f'train={curve["train_bpc"][-1]:.3f} '
      + (f'val≈{val:.3f} (estimate)' if estimate else f'val={val:.3f}')
    )
  return {'curve': curve, 'losses': losses, 'seconds': seconds}


def fit(
  corpus: data.Corpus,
  model_cfg: model.ModelConfig,
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
    variant: a key of ``model.VARIANTS``.
    seed: seeds both the initial weights and the order of the batches.
    placement: device layout; ``None`` runs on the default device.
    desc: the progress bar's label.
    progress: show a progress bar on stderr.

  Returns:
    A dict of plain Python values (JSON-ready): parameter counts, the train
    loss and validation curves in bits per character (``curve``; its last
    validation point is ``val_bpc``), the validation loss on the whole
    split (``val_bpc``), training throughput and where the time went.

  Raises:
    FloatingPointError: the loss diverged.
  """
  lm = model.build_model(model_cfg, variant, seed)
  graphdef, params = nnx.split(lm, nnx.Param)
  ffn_params = model.count_params(nnx.state(lm.blocks[0].ffn, nnx.Param))
  run = compile_run(graphdef, params, make_optimizer(train_cfg), placement)
  validator = Validator(
    corpus.val,
    model_cfg.seq_len,
    batch_size=train_cfg.batch_size,
    curve_windows=train_cfg.curve_windows,
    put=run.put,
  )
  bar = _progress(train_cfg.steps, desc or variant, progress)
  log = train_loop(
    run,
    validator,
    corpus.train,
    train_cfg,
    seq_len=model_cfg.seq_len,
    seed=seed,
    bar=bar,
  )
  bar.close()
  val = log['curve']['val_bpc'][-1]
  if not math.isfinite(val):
    raise FloatingPointError(f'{variant} seed {seed}: the loss diverged')
  tokens = train_cfg.batch_size * model_cfg.seq_len
  seconds = log['seconds']
  last = log['losses'][-FINAL_TRAIN_STEPS:]
  return {
    'variant': variant,
    'seed': seed,
    'params': model.count_params(run.params),
    'ffn_params_per_layer': ffn_params,
    'ffn_hidden': model.hidden_features(
      model_cfg.d_model, model.VARIANTS[variant][0]
    ),
    'final_train_bpc': float(np.mean(last)) / math.log(2),
    'val_bpc': val,
    'val_tokens': validator.windows * model_cfg.seq_len,
    'tokens_per_second': (
      (train_cfg.steps - 1) * tokens / seconds['train']
      if seconds['train']
      else None
    ),
    'seconds': seconds,
    'curve': {**log['curve'], **validator.describe()},
    'train_loss_per_step': log['losses'],
  }


def run_info(corpus: data.Corpus, runs: list[dict], wall: float) -> dict:
  """The results-JSON fields every language-model example records.

  The corpus, the software versions and devices, the wall time, and what
  the validation figures mean (their definition is one for every script).
  """
  return {
    'corpus': corpus.info,
    'versions': {
      'python': sys.version.split()[0],
      'jax': jax.__version__,
      'flaxact': flaxact.__version__,
    },
    'devices': [str(d) for d in jax.devices()],
    'wall_seconds': wall,
    'validation': {
      'val_bpc': 'mean next-character loss (bits per character) over every'
      ' non-overlapping window of the validation split; the table and the'
      " curve's last point",
      'curve': runs[0]['curve']['intermediate_points'] if runs else None,
    },
  }
