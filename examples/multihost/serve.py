"""A training checkpoint restored onto another topology, and served.

Users train on a pod and serve on one accelerator. ``check`` restores the
newest checkpoint's parameters (the ``params`` item alone, no optimizer
state) into this one process in three layouts and compares each with the
logits the training job computed on its own mesh (``reference.npz``):

- ``expert mesh``: every device of this process on the ``expert`` axis
  (e.g. ``expert=8``), with flaxact's expert-parallel rules;
- ``one device``: every parameter whole on the first device;
- ``int8 PTQ``: the one-device model quantized by Qwix post-training
  quantization (int8 weights of every FFN projection, the MoE experts
  included; the router stays float), the serving layout. Its logits differ
  from float by the quantization error, which is reported.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from charlm import model
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from multihost import checkpoints, lm

#: Qwix rule: int8 weights for every FFN projection (dense and experts).
PTQ_MODULES = r'blocks/\d+/ffn/(gate_proj|up_proj|down_proj)'


def _to_host(tree):
  return jax.tree.map(np.asarray, tree)


def _same(a, b) -> bool:
  """Every leaf of two host trees bit-equal, dtype included."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


def next_char_loss(logits: np.ndarray, tokens: np.ndarray) -> float:
  """Mean cross-entropy (nats) of ``logits[:, t]`` predicting token t + 1."""
  logits = logits[:, :-1].astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, tokens[:, 1:, None], -1)
  return float(-picked.mean())


def _restore(ckpts, step, params, shardings):
  t0 = time.perf_counter()
  restored = ckpts.restore_params(step, params, shardings)
  jax.block_until_ready(restored)
  return restored, time.perf_counter() - t0


def check(ckpt_dir: str, reference: dict) -> dict:
  """Restores the newest checkpoint in every layout; measures each.

  Args:
    ckpt_dir: the training run's checkpoint directory.
    reference: ``tokens``, ``logits`` and ``step`` of the training job.

  Returns:
    Per layout: devices, restore seconds (for PTQ: quantization seconds),
    the largest logit difference from the training job's (absolute, and
    relative to the largest logit), the next-character loss on the tokens
    and its relative difference from the training job's, and whether the
    parameters equal the one-device restore bit for bit.

  Raises:
    ValueError: no checkpoint, or the newest is not the reference's step.
  """
  ckpts = checkpoints.Checkpoints(ckpt_dir, every=1, keep=None)
  step = ckpts.latest_step()
  if step is None:
    raise ValueError(f'no complete checkpoint in {ckpt_dir}')
  if step != int(reference['step']):
    raise ValueError(
      f'the newest checkpoint is step {step}; the reference logits are of'
      f' step {int(reference["step"])}'
    )
  meta = ckpts.restore_meta(step)
  model_cfg = model.ModelConfig(**meta['config']['model'])
  moe_cfg = lm.MoEConfig(**meta['config']['moe'])
  graphdef, params = lm.build(model_cfg, moe_cfg, meta['seed'])
  tokens, ref = reference['tokens'], reference['logits']
  scale = float(np.abs(ref).max())
  ref_loss = next_char_loss(ref, tokens)
  logits_of = jax.jit(lm.logits_fn(graphdef))
  rows = []

  def add(layout, devices, seconds, logits, params_equal):
    logits = np.asarray(logits)
    diff = float(np.abs(logits - ref).max())
    loss = next_char_loss(logits, tokens)
    rows.append(
      {
        'layout': layout,
        'devices': devices,
        'restore_seconds': seconds,
        'max_abs_logit_difference': diff,
        'max_rel_logit_difference': diff / scale,
        'next_char_loss': loss,
        'rel_loss_difference': abs(loss - ref_loss) / ref_loss,
        'params_equal_one_device': params_equal,
      }
    )

  # One device: every parameter whole.
  one = SingleDeviceSharding(jax.devices()[0])
  single, seconds = _restore(
    ckpts, step, params, jax.tree.map(lambda _: one, params)
  )
  single_host = _to_host(single)
  add('one device', 1, seconds, logits_of(single, jnp.asarray(tokens)), True)

  # Every device of this process on the expert axis.
  n_expert = math.gcd(moe_cfg.experts, jax.device_count())
  mesh = lm.make_mesh(jax.device_count() // n_expert, n_expert)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(lm.RULES):
    param_sh, _ = lm.shardings(params, mesh)
    on_mesh, seconds = _restore(ckpts, step, params, param_sh)
    x = jax.device_put(tokens, NamedSharding(mesh, P(lm.BATCH_AXES, None)))
    logits = logits_of(on_mesh, x)
  add(
    f'expert mesh {mesh.shape["data"]}x{n_expert}',
    jax.device_count(),
    seconds,
    logits,
    _same(_to_host(on_mesh), single_host),
  )

  # The serving layout: int8 PTQ of the one-device model.
  import qwix

  float_model = nnx.merge(graphdef, single)
  t0 = time.perf_counter()
  provider = qwix.PtqProvider(
    [qwix.QuantizationRule(module_path=PTQ_MODULES, weight_qtype='int8')]
  )
  served = qwix.quantize_model(float_model, provider, jnp.asarray(tokens))
  seconds = time.perf_counter() - t0
  kernel = served.blocks[moe_cfg.moe_every - 1].ffn.gate_proj.kernel[...]
  add('int8 PTQ, one device', 1, seconds, served(jnp.asarray(tokens)), True)
  ckpts.close()
  return {
    'step': step,
    'reference_next_char_loss': ref_loss,
    'layouts': rows,
    'expert_kernel_dtype': str(kernel.array.qvalue.dtype),
    'expert_kernel_shape': list(kernel.array.qvalue.shape),
  }
