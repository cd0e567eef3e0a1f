"""Sharded, asynchronous, atomic Orbax checkpoints of a training run.

Every ``every`` steps all processes call ``save`` together; each writes the
shards its devices hold (Orbax's ``StandardSave``), process 0 writes the
small JSON item (step, data position, seed, configuration), and the write
finishes in a background thread while training goes on. Orbax writes a
step into a temporary directory and renames it only when every process has
finished: a checkpoint that did not finish (a process killed mid-write) is
never listed, so ``latest_step`` is always a complete one, and
``cleanup_tmp_directories`` removes the leftovers when the next run starts.

Items: ``params`` and ``opt_state`` (sharded arrays), ``meta`` (JSON). A
server restores ``params`` alone, onto any devices (``restore_params``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ('params', 'opt_state', 'meta')


def _abstract(tree, shardings):
  """``ShapeDtypeStruct``s of ``tree`` placed by ``shardings``."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


class Checkpoints:
  """An Orbax ``CheckpointManager`` for one run's directory."""

  def __init__(self, directory: str, *, every: int, keep: int | None) -> None:
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=every,
      max_to_keep=keep,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
    )
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=ITEMS
    )
    self.save_seconds: list[float] = []  # blocking part of each save

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete checkpoint's step, oldest first."""
    return sorted(self.manager.all_steps())

  def save(
    self, step: int, params, opt_state, meta: dict, *, force: bool = False
  ) -> bool:
    """Starts saving ``step`` (every process calls it); returns if it did.

    Returns at once after the arrays are copied off the devices; the files
    are written in the background (``wait`` blocks until they are).
    """
    t0 = time.perf_counter()
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )
    if saved:
      self.save_seconds.append(time.perf_counter() - t0)
    return saved

  def wait(self) -> float:
    """Blocks until the pending save is on disk; returns the seconds."""
    t0 = time.perf_counter()
    self.manager.wait_until_finished()
    return time.perf_counter() - t0

  def restore(self, step: int, params, opt_state, param_sh, opt_sh):
    """``(params, opt_state, meta)`` of ``step``, placed as given."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params, param_sh)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state, opt_sh)),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored['params'], restored['opt_state'], restored['meta']

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON item of ``step`` alone."""
    restored = self.manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    return restored['meta']

  def restore_params(self, step: int, params, param_sh):
    """The parameters of ``step`` alone, onto ``param_sh``'s devices."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params, param_sh))
      ),
    )
    return restored['params']

  def step_bytes(self, step: int) -> int:
    """Bytes on disk of checkpoint ``step`` (every file under it)."""
    root = os.path.join(self.directory, str(step))
    return sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, files in os.walk(root)
      for f in files
    )

  def close(self) -> None:
    """Waits for the pending save, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
