"""The model, the mesh, the data stream and the jit-compiled steps.

The model is ``charlm``'s pre-LayerNorm decoder over characters whose FFNs
alternate between a dense flaxact ``SwiGLU`` and a flaxact ``MoE`` (SwiGLU
experts, softmax router, load-balancing loss): every ``moe_every``-th block
is an MoE. The mesh has two axes, ``data`` and ``expert``; flaxact's
``EXPERT_PARALLEL_RULES`` put the experts axis of the expert kernels on
``expert`` and replicate everything else. A batch is split over both mesh
axes (every device computes its own rows; the MoE layers send tokens to
their experts' devices with all-to-all).

Data: the training split cut into non-overlapping windows, visited in
epochs, each epoch in its own shuffled order (seeded by ``(seed, epoch)``).
The stream's *position* is the number of windows consumed so far: batch
``b`` of ``B`` rows is the windows at positions ``b * B`` to
``(b + 1) * B - 1``, so a checkpoint that stores the position resumes the
stream exactly. Each process reads only the rows its devices hold and
builds the global batch with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import UsageError, option
from charlm import data, model
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxact import nnx as fnnx

#: flaxact's expert-parallel rules plus this model's own axes (replicated).
RULES = (*fnnx.EXPERT_PARALLEL_RULES, ('heads', None), ('vocab', None))
#: A batch is split over every mesh axis.
BATCH_AXES = ('data', 'expert')


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The MoE blocks (each option is also a command-line flag)."""

  experts: int = option(8, 'experts per MoE layer (E)')
  top_k: int = option(2, 'experts per token (k)')
  moe_every: int = option(
    2, 'every Nth block has an MoE FFN, the others a dense SwiGLU'
  )
  aux_coef: float = option(0.01, 'weight of the load-balancing loss')

  def check(self, layers: int) -> None:
    """Raises ``UsageError`` for a routing the model cannot have."""
    if self.top_k > self.experts:
      raise UsageError(f'--top-k {self.top_k} exceeds --experts {self.experts}')
    if self.moe_every > layers:
      raise UsageError(
        f'--moe-every {self.moe_every} exceeds --layers {layers}: the model'
        ' would have no MoE block'
      )

  def is_moe(self, block: int) -> bool:
    """Whether block ``block`` (from 0) has an MoE FFN."""
    return block % self.moe_every == self.moe_every - 1


def widths(d_model: int, cfg: MoEConfig) -> dict[str, int]:
  """Dense SwiGLU width, and each expert's (equal active parameters)."""
  dense = model.hidden_features(d_model, True)
  return {'dense': dense, 'expert': math.ceil(dense / cfg.top_k)}


def ffn_factory(cfg: MoEConfig) -> model.FFNFactory:
  """FFNs for ``charlm.model.build_model``: SwiGLU and MoE, by block.

  ``charlm`` builds its blocks in order, so the factory counts the calls.
  """
  blocks = itertools.count()

  def make(d_model: int, rngs: nnx.Rngs) -> nnx.Module:
    width = widths(d_model, cfg)
    if not cfg.is_moe(next(blocks)):
      return fnnx.SwiGLU(
        d_model, width['dense'], use_bias=False, remat=False, rngs=rngs
      )
    return fnnx.MoE(
      d_model,
      width['expert'],
      cfg.experts,
      cfg.top_k,
      activation='silu',
      remat=False,
      rngs=rngs,
    )

  return make


def build(model_cfg: model.ModelConfig, moe_cfg: MoEConfig, seed: int):
  """The model's graph and its parameters (host values, no mesh)."""
  lm = model.build_model(model_cfg, 'swiglu', seed, ffn=ffn_factory(moe_cfg))
  return nnx.split(lm, nnx.Param)


def make_mesh(n_data: int, n_expert: int, devices=None) -> jax.sharding.Mesh:
  """The ``(data, expert)`` mesh over ``devices`` (default: all of them)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
    (n_data, n_expert),
    ('data', 'expert'),
    (AxisType.Auto, AxisType.Auto),
    devices=devices,
  )


def default_mesh_shape(experts: int) -> tuple[int, int]:
  """Experts within a host, data across hosts: ``(data, expert)``.

  The ``expert`` axis is as large as the experts and this process's devices
  allow (``gcd``), so the all-to-all of the MoE stays on one host's fast
  links; ``data`` takes the rest of the devices.
  """
  n_expert = math.gcd(experts, jax.local_device_count())
  return jax.device_count() // n_expert, n_expert


def parse_mesh(spec: str | None, experts: int) -> tuple[int, int]:
  """``(data, expert)`` from ``'DxE'``, or the default; checked."""
  if spec is None:
    return default_mesh_shape(experts)
  try:
    n_data, n_expert = (int(v) for v in spec.lower().split('x'))
  except ValueError:
    raise UsageError(
      f'--mesh {spec!r} is not of the form DATAxEXPERT, e.g. 2x4'
    ) from None
  n = jax.device_count()
  if n_data < 1 or n_expert < 1 or n_data * n_expert != n:
    raise UsageError(
      f'--mesh {spec} has {n_data * n_expert} devices; the job has {n}'
      f' ({jax.process_count()} process(es) x {jax.local_device_count()})'
    )
  if experts % n_expert:
    raise UsageError(
      f'--experts {experts} is not divisible by the expert axis ({n_expert})'
    )
  return n_data, n_expert


def shardings(params, mesh):
  """The parameters' ``NamedSharding``s by ``RULES``, and a batch's."""
  with nnx.logical_axis_rules(RULES):
    param_sh = nnx.get_named_sharding(params, mesh)
  return param_sh, NamedSharding(mesh, P(BATCH_AXES, None))


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> range:
  """The rows of a global batch that this process's devices hold.

  Raises:
    ValueError: the rows are not one contiguous range (a device order that
      ``make_array_from_process_local_data`` cannot take as one block).
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(shape[0])[index[0]])
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f'this process holds rows {sorted(rows)}: not contiguous')
  return range(lo, hi)


class Stream:
  """Training windows in shuffled epochs; the position is a window count."""

  def __init__(self, ids: np.ndarray, seq_len: int, seed: int) -> None:
    self.windows = data.eval_windows(ids, seq_len)  # (n, seq_len + 1)
    self.seed = seed
    self._order: dict[int, np.ndarray] = {}

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch not in self._order:
      rng = np.random.default_rng([self.seed, epoch])
      self._order = {epoch: rng.permutation(len(self.windows))}
    return self._order[epoch]

  def rows(self, position: int, rows: range) -> np.ndarray:
    """Rows ``rows`` of the batch that starts at window ``position``."""
    n = len(self.windows)
    picked = []
    for r in rows:
      epoch, i = divmod(position + r, n)
      picked.append(self.windows[self._epoch_order(epoch)[i]])
    return np.stack(picked)


def global_batch(host_rows: np.ndarray, sharding, shape) -> jax.Array:
  """The global batch from this process's rows (no other process's data)."""
  return jax.make_array_from_process_local_data(sharding, host_rows, shape)


def _cross_entropy(logits, batch) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean(-1)


def make_steps(graphdef, tx, moe_cfg: MoEConfig, layers: int):
  """Pure ``train_step`` and ``eval_step``.

  ``train_step(params, opt_state, batch)`` returns the new parameters and
  optimiser state, the cross-entropy (nats) and the MoE layers' mean
  load-balancing loss; it differentiates ``ce + aux_coef * balance``.
  ``eval_step(params, batch)`` returns the window losses ``(batch,)``.
  """
  moe_blocks = [i for i in range(layers) if moe_cfg.is_moe(i)]

  def loss_fn(params, batch):
    lm = nnx.merge(graphdef, params)
    logits, aux = nnx.capture(lm, nnx.Intermediate)(batch[:, :-1])
    ce = _cross_entropy(logits, batch).mean()
    blocks = nnx.to_pure_dict(aux)['blocks']
    balance = jnp.mean(
      jnp.stack(
        [blocks[i]['ffn']['load_balancing_loss'][0] for i in moe_blocks]
      )
    )
    return ce + moe_cfg.aux_coef * balance, (ce, balance)

  def train_step(params, opt_state, batch):
    grads, (ce, balance) = jax.grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, balance

  def eval_step(params, batch):
    return _cross_entropy(nnx.merge(graphdef, params)(batch[:, :-1]), batch)

  return train_step, eval_step


def logits_fn(graphdef):
  """``(params, tokens) -> logits`` in float32, for comparing layouts."""

  def logits(params, tokens):
    return nnx.merge(graphdef, params)(tokens).astype(jnp.float32)

  return logits


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays."""
  return model.count_params(tree)
