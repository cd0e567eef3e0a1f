"""One training job on the global mesh: setup, resume, the loop, results.

Every process runs the same code on its own devices. Only process 0 shows
the progress bar, prints, and writes files other than checkpoints; every
process takes part in each step, each checkpoint and each evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from charlm import data
from charlm import train as charlm_train
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from multihost import checkpoints, lm


@dataclasses.dataclass
class Job:
  """The state of one process's share of the run, and its compiled steps."""

  mesh: jax.sharding.Mesh
  graphdef: Any
  params: Any
  opt_state: Any
  param_sh: Any
  opt_sh: Any
  batch_sh: NamedSharding
  train_step: Any
  eval_step: Any
  batch_shape: tuple[int, int]
  rows: range  # the rows of every batch this process reads


def setup(model_cfg, train_cfg, moe_cfg, mesh, seed: int) -> Job:
  """Builds the model on ``mesh`` and compiles the steps (lazily)."""
  graphdef, params = lm.build(model_cfg, moe_cfg, seed)
  param_sh, batch_sh = lm.shardings(params, mesh)
  tx = charlm_train.make_optimizer(train_cfg)
  params = jax.device_put(params, param_sh)
  opt_state = jax.jit(tx.init)(params)  # moments laid out like params
  opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
  train_step, eval_step = lm.make_steps(graphdef, tx, moe_cfg, model_cfg.layers)
  replicated = NamedSharding(mesh, P())
  shape = (train_cfg.batch_size, model_cfg.seq_len + 1)
  return Job(
    mesh,
    graphdef,
    params,
    opt_state,
    param_sh,
    opt_sh,
    batch_sh,
    jax.jit(
      train_step,
      in_shardings=(param_sh, opt_sh, batch_sh),
      out_shardings=(param_sh, opt_sh, replicated, replicated),
      donate_argnums=(0, 1),
    ),
    jax.jit(
      eval_step, in_shardings=(param_sh, batch_sh), out_shardings=replicated
    ),
    shape,
    lm.local_rows(batch_sh, shape),
  )


def resume(job: Job, ckpts: checkpoints.Checkpoints, seed: int):
  """Loads the newest complete checkpoint into ``job``.

  Returns:
    ``(step, data_position, restore_seconds)``; ``(0, 0, None)`` when there
    is no checkpoint yet.

  Raises:
    ValueError: the checkpoint was written with another seed.
  """
  step = ckpts.latest_step()
  if step is None:
    return 0, 0, None
  t0 = time.perf_counter()
  job.params, job.opt_state, meta = ckpts.restore(
    step, job.params, job.opt_state, job.param_sh, job.opt_sh
  )
  seconds = time.perf_counter() - t0
  if meta['seed'] != seed:
    raise ValueError(
      f'checkpoint {step} was trained with --seed {meta["seed"]}, not {seed}'
    )
  return meta['step'], meta['data_position'], seconds


class Evaluator:
  """Validation loss in bits per character, as ``charlm`` defines it.

  ``whole``: every non-overlapping window of the validation split (the
  curve's last point); ``sample``: ``count`` of them spread evenly over the
  split (the intermediate points, an estimate). Each process puts its own
  rows of every batch; every process gets the number.
  """

  def __init__(self, job: Job, val_ids: np.ndarray, seq_len: int, count: int):
    windows = data.eval_windows(val_ids, seq_len)
    self._whole = self._batches(job, windows)
    self._sample = self._batches(job, data.spread_sample(windows, count))

  @staticmethod
  def _batches(job: Job, windows: np.ndarray):
    batches, n = data.batches_of(windows, job.batch_shape[0])
    rows = slice(job.rows.start, job.rows.stop)
    return [
      lm.global_batch(b[rows], job.batch_sh, job.batch_shape) for b in batches
    ], n

  @staticmethod
  def _loss(job: Job, batches) -> float:
    device_batches, n = batches
    per_window = np.concatenate(
      [np.asarray(job.eval_step(job.params, b)) for b in device_batches]
    )[:n]
    return float(per_window.mean()) / math.log(2)

  def whole(self, job: Job) -> float:
    """The validation loss: every window of the split."""
    return self._loss(job, self._whole)

  def sample(self, job: Job) -> float:
    """The estimate on the spread sample of windows."""
    return self._loss(job, self._sample)


def _bar(total: int, initial: int, enabled: bool):
  return tqdm(
    total=total,
    initial=initial,
    desc='train',
    unit='step',
    file=sys.stderr,
    disable=not enabled,
    leave=False,
    dynamic_ncols=True,
  )


def loop(job, stream, ckpts, evaluator, cfg, *, start, position, meta, out):
  """Trains from step ``start + 1`` to ``cfg.steps``; returns the logs.

  Saves a checkpoint every ``cfg.checkpoint_every`` steps and after the
  last; evaluates every ``cfg.eval_every`` steps (the last point on the
  whole validation split); prints ``step N loss L`` every
  ``cfg.log_every`` steps (process 0).

  Raises:
    FloatingPointError: the loss is not finite.
  """
  first = jax.process_index() == 0
  logs = {'step': [], 'loss': [], 'balance': [], 'seconds': [], 'saved': []}
  curve = {'step': [], 'val_bpc': []}
  bar = _bar(cfg.steps, start, first and cfg.progress)
  for step in range(start + 1, cfg.steps + 1):
    host_rows = stream.rows(position, job.rows)
    batch = lm.global_batch(host_rows, job.batch_sh, job.batch_shape)
    t0 = time.perf_counter()
    job.params, job.opt_state, ce, balance = job.train_step(
      job.params, job.opt_state, batch
    )
    ce, balance = float(ce), float(balance)  # waits for the step
    logs['seconds'].append(time.perf_counter() - t0)
    position += job.batch_shape[0]
    if not math.isfinite(ce):
      raise FloatingPointError(f'step {step}: the loss is {ce}')
    logs['step'].append(step)
    logs['loss'].append(ce)
    logs['balance'].append(balance)
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
      if ckpts.save(
        step,
        job.params,
        job.opt_state,
        {**meta, 'step': step, 'data_position': position},
        force=step == cfg.steps,
      ):
        logs['saved'].append(step)
    if first and cfg.log_every and step % cfg.log_every == 0:
      print(f'step {step} loss {ce!r}', file=out, flush=True)
    bar.update(1)
    if step % cfg.eval_every == 0 or step == cfg.steps:
      last = step == cfg.steps
      curve['step'].append(step)
      curve['val_bpc'].append(
        (evaluator.whole if last else evaluator.sample)(job)
      )
      bar.set_postfix_str(
        f'train={ce / math.log(2):.3f} val={curve["val_bpc"][-1]:.3f}'
      )
  bar.close()
  return logs, curve, position


def reference_logits(job: Job, tokens: np.ndarray) -> np.ndarray:
  """The trained model's logits on ``tokens`` (gathered on every process).

  ``tokens`` has a multiple of the mesh size rows; each process puts its
  own rows. ``multihost.serve`` compares other layouts against these.
  """
  shape = tokens.shape
  sharding = NamedSharding(job.mesh, P(lm.BATCH_AXES, None))
  rows = lm.local_rows(sharding, shape)
  x = lm.global_batch(tokens[rows.start : rows.stop], sharding, shape)
  logits = jax.jit(lm.logits_fn(job.graphdef))(job.params, x)
  return np.asarray(multihost_utils.process_allgather(logits, tiled=True))


def param_bytes(job: Job) -> dict[str, int]:
  """Parameter bytes in all, and on this process's first device."""
  device = jax.local_devices()[0]
  leaves = jax.tree.leaves(job.params)
  return {
    'total': sum(x.nbytes for x in leaves),
    'first_device': sum(
      s.data.nbytes
      for x in leaves
      for s in x.addressable_shards
      if s.device == device
    ),
  }
