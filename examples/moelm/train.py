"""Training one arm: balancing, recorded expert load, validation.

The step is ``charlm``'s (AdamW with warmup and cosine decay, clipping at
1, next-character cross-entropy) with what a mixture of experts adds:

- the MoE layers run under ``nnx.capture(model, nnx.Intermediate)``, which
  returns what each layer recorded: ``load_balancing_loss`` and
  ``expert_load`` (tokens routed to each expert);
- ``moe_softmax`` adds ``aux_coef`` times the layers' mean load-balancing
  loss to the loss it differentiates;
- ``moe_sigmoid`` adds nothing: after every step each layer's
  ``score_correction_bias`` (an ``nnx.BatchStat``, not a parameter) moves by
  ``flaxact.update_score_correction_bias`` with the step's expert load.

The reported losses are the cross-entropy alone, in bits per character; the
validation loss is ``charlm``'s (the whole validation split; intermediate
curve points are the labelled estimate).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from charlm import data, model, train
from charlm.validation import Validator
from flax import nnx
from tqdm.auto import tqdm

import flaxact
from moelm import arms

#: Training steps whose expert load gives the final load imbalance.
FINAL_LOAD_STEPS = 50


def _cross_entropy(logits, batch) -> jax.Array:
  """Mean next-character loss of each window, in nats: ``(batch,)``."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean(-1)


def _recorded(aux, name: str, layers: int) -> list[jax.Array]:
  """What each block's MoE recorded under ``name``, in block order."""
  blocks = nnx.to_pure_dict(aux)['blocks']
  return [blocks[i]['ffn'][name][0] for i in range(layers)]


def make_step(graphdef, tx, arm: str, cfg: arms.MoEConfig, layers: int):
  """The pure train step ``(params, stats, opt_state, batch) -> ...``.

  Returns:
    A function returning the new ``params``, ``stats`` (the routers'
    biases) and ``opt_state``, the cross-entropy in nats, the layers' mean
    load-balancing loss, and the ``(layers, experts)`` expert load.
  """
  spec = arms.ARMS[arm]
  coef = cfg.aux_coef if spec.balance == 'loss' else 0.0

  def loss_fn(params, stats, batch):
    lm = nnx.merge(graphdef, params, stats)
    if spec.router is None:
      logits = lm(batch[:, :-1])
      ce = _cross_entropy(logits, batch).mean()
      return ce, (ce, jnp.zeros(()), jnp.zeros((layers, 0), jnp.int32))
    logits, aux = nnx.capture(lm, nnx.Intermediate)(batch[:, :-1])
    ce = _cross_entropy(logits, batch).mean()
    balance = jnp.mean(jnp.stack(_recorded(aux, 'load_balancing_loss', layers)))
    load = jnp.stack(_recorded(aux, 'expert_load', layers))
    return ce + coef * balance, (ce, balance, load)

  def step(params, stats, opt_state, batch):
    grads, (ce, balance, load) = jax.grad(loss_fn, has_aux=True)(
      params, stats, batch
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if spec.balance == 'bias':
      lm = nnx.merge(graphdef, params, stats)
      for i, block in enumerate(lm.blocks):
        bias = block.ffn.score_correction_bias
        bias.value = flaxact.update_score_correction_bias(
          bias.value, load[i], rate=cfg.bias_rate
        )
      _, _, stats = nnx.split(lm, nnx.Param, nnx.BatchStat)
    return params, stats, opt_state, ce, balance, load

  return step


def make_eval_step(graphdef):
  """``(state, batch) -> (batch,)`` window losses, ``state = (params, stats)``.

  Outside ``nnx.capture`` the MoE layers record nothing.
  """

  def eval_step(state, batch):
    params, stats = state
    logits = nnx.merge(graphdef, params, stats)(batch[:, :-1])
    return _cross_entropy(logits, batch)

  return eval_step


def imbalance(load: np.ndarray) -> list[float]:
  """Per layer, the busiest expert's load over the mean: ``(layers, E)``."""
  load = load.astype(np.float64)
  return [float(x) for x in load.max(-1) / load.mean(-1)]


def _stops(cfg: train.TrainConfig) -> list[int]:
  """Steps after which the loop stops: 1 (compiles), evals, the last."""
  stops = list(range(cfg.eval_every, cfg.steps, cfg.eval_every))
  return sorted({1, *stops, cfg.steps})


def train_loop(
  step, eval_step, state, corpus, validator, cfg, *, seq_len, seed, bar
):
  """Runs the steps; returns the curve, per-step logs and timings."""
  params, stats, opt_state = state
  rng = np.random.default_rng(seed)
  curve = {'step': [], 'train_bpc': [], 'val_bpc': [], 'val_is_estimate': []}
  ce_log, balance_log, loads = [], [], []
  seconds = {'first_step': 0.0, 'train': 0.0, 'eval': 0.0}
  cpu0 = time.process_time()
  done = 0
  for stop in _stops(cfg):
    t0 = time.perf_counter()
    pending = []
    for _ in range(stop - done):
      batch = jnp.asarray(
        data.sample_batch(corpus.train, rng, cfg.batch_size, seq_len)
      )
      params, stats, opt_state, *logs = step(params, stats, opt_state, batch)
      pending.append(logs)
    for ce, balance, load in jax.device_get(pending):
      ce_log.append(float(ce))
      balance_log.append(float(balance))
      loads.append(load)
    seconds['first_step' if done == 0 else 'train'] += time.perf_counter() - t0
    bar.update(stop - done)
    done = stop
    if done % cfg.eval_every and done != cfg.steps:
      continue
    t0 = time.perf_counter()
    last = done == cfg.steps
    evaluate = validator.whole_split if last else validator.curve_point
    val = evaluate(eval_step, (params, stats))
    seconds['eval'] += time.perf_counter() - t0
    previous = curve['step'][-1] if curve['step'] else 0
    curve['step'].append(done)
    curve['train_bpc'].append(
      float(np.mean(ce_log[previous:done])) / math.log(2)
    )
    curve['val_bpc'].append(val)
    curve['val_is_estimate'].append(validator.estimate and not last)
    bar.set_postfix_str(f'train={curve["train_bpc"][-1]:.3f} val={val:.3f}')
  # CPU seconds of this process (all threads): on a shared machine, a bound
  # on the wall time the same run would take on idle cores.
  seconds['process_cpu'] = time.process_time() - cpu0
  return curve, ce_log, balance_log, np.stack(loads), seconds, stats


def fit(
  corpus: data.Corpus,
  model_cfg: model.ModelConfig,
  train_cfg: train.TrainConfig,
  moe_cfg: arms.MoEConfig,
  arm: str,
  seed: int,
  *,
  desc: str | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains one arm and returns its numbers as plain Python values.

  Returns:
    Parameter counts (total and active), the validation loss on the whole
    split (``val_bpc``, also the curve's last point), the curves, the
    expert load of every step (``expert_load``: ``[step][layer][expert]``
    tokens, empty for dense arms), the final load imbalance and the
    throughput.

  Raises:
    FloatingPointError: the loss diverged.
  """
  lm = model.build_model(
    model_cfg, 'swiglu', seed, ffn=arms.ffn_factory(arm, moe_cfg)
  )
  counts = arms.param_counts(lm, arm, moe_cfg)
  graphdef, params, stats = nnx.split(lm, nnx.Param, nnx.BatchStat)
  tx = train.make_optimizer(train_cfg)
  step = jax.jit(
    make_step(graphdef, tx, arm, moe_cfg, model_cfg.layers),
    donate_argnums=(0, 1, 2),
  )
  eval_step = jax.jit(make_eval_step(graphdef))
  validator = Validator(
    corpus.val,
    model_cfg.seq_len,
    batch_size=train_cfg.batch_size,
    curve_windows=train_cfg.curve_windows,
    put=jnp.asarray,
  )
  bar = tqdm(
    total=train_cfg.steps,
    desc=desc or arm,
    unit='step',
    file=sys.stderr,
    disable=not progress,
    leave=False,
    dynamic_ncols=True,
  )
  curve, ce, balance, loads, seconds, stats = train_loop(
    step,
    eval_step,
    (params, stats, tx.init(params)),
    corpus,
    validator,
    train_cfg,
    seq_len=model_cfg.seq_len,
    seed=seed,
    bar=bar,
  )
  bar.close()
  if not math.isfinite(curve['val_bpc'][-1]):
    raise FloatingPointError(f'{arm} seed {seed}: the loss diverged')
  tokens = train_cfg.batch_size * model_cfg.seq_len
  final = loads[-FINAL_LOAD_STEPS:].sum(0)
  moe = arms.ARMS[arm].router is not None
  return {
    'arm': arm,
    'seed': seed,
    'params': counts,
    'ffn_hidden': arms.widths(model_cfg.d_model, moe_cfg)[arms.ARMS[arm].width],
    'final_train_bpc': float(np.mean(ce[-train.FINAL_TRAIN_STEPS :]))
    / math.log(2),
    'val_bpc': curve['val_bpc'][-1],
    'val_tokens': validator.windows * model_cfg.seq_len,
    'tokens_per_second': (
      (train_cfg.steps - 1) * tokens / seconds['train']
      if seconds['train']
      else None
    ),
    'seconds': seconds,
    'final_load_imbalance': imbalance(final) if moe else None,
    'final_load': final.tolist() if moe else None,
    'score_correction_bias': (
      [np.asarray(b).tolist() for b in jax.tree.leaves(stats)]
      if arms.ARMS[arm].balance == 'bias'
      else None
    ),
    'balance_loss_per_step': balance if moe else None,
    'expert_load': loads.tolist() if moe else None,
    'curve': {**curve, **validator.describe()},
    'train_loss_per_step': ce,
  }
