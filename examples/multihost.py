r"""Multi-host training of a small MoE language model, with checkpoints.

JAX scales past one machine with its multi-controller runtime: one Python
process per host, ``jax.distributed.initialize``, one global mesh over every
host's devices. This example trains ``charlm``'s decoder over characters,
with flaxact ``SwiGLU`` and ``MoE`` blocks, on a ``data x expert`` mesh
(``flaxact.nnx.EXPERT_PARALLEL_RULES``) with optax; each process reads only
its own rows of every batch (``jax.make_array_from_process_local_data``).
All processes save sharded Orbax checkpoints together every
``--checkpoint-every`` steps (parameters, optimizer state, step and data
position; asynchronous and atomic), and ``--resume`` continues from the
newest complete one with the same losses, bit for bit, as a run that was
never interrupted.

On one machine, ``--num-processes 2`` starts two processes on localhost,
each with ``--cpu-devices`` simulated CPU devices::

  python examples/multihost.py --num-processes 2          # data 2 x expert 4
  python examples/multihost.py --num-processes 2 --resume # after a crash
  python examples/multihost.py --num-processes 1 --cpu-devices 8 --mesh 2x4
  python examples/multihost.py --serve                    # restore elsewhere

On real hosts the same script runs once per host (see docs/multihost.md)::

  python examples/multihost.py --coordinator-address HOST0:1234 \
      --num-processes 4 --process-id $RANK
  srun python examples/multihost.py --auto-cluster       # SLURM and others

Process 0 shows a progress bar, prints the results table, and writes
``results.json``, ``reference.npz`` and ``multihost.png`` to ``--out``;
checkpoints go to ``--out``/checkpoints. ``--serve`` restores the newest
checkpoint into this one process on an ``expert`` mesh, on one device and
as Qwix int8 PTQ, and compares the logits with the training job's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import _cli
import numpy as np
from charlm import data, flags
from multihost import cluster

DEFAULTS = {
  'steps': 300,
  'd_model': 64,
  'batch_size': 32,
  'eval_every': 100,
  'curve_windows': 128,
}


def build_parser() -> argparse.ArgumentParser:
  p = _cli.Parser(
    prog='multihost.py',
    description=(
      'Train a small decoder LM with flaxact SwiGLU and MoE blocks on a'
      ' global data x expert mesh over one or more processes (JAX'
      ' multi-controller), with sharded Orbax checkpoints and --resume.'
      ' --num-processes N alone starts N processes on this machine. Data:'
      ' --text, or the built-in corpus of standard-library source. The'
      ' default run (300 steps, 2 processes) takes about a minute on 2 CPU'
      ' cores.'
    ),
    formatter_class=_cli.HelpFormatter,
  )
  flags.add_common_flags(p, **DEFAULTS)
  from multihost import lm

  _cli.add_flags(p, lm.MoEConfig)
  g = p.add_argument_group('cluster')
  g.add_argument(
    '--num-processes',
    type=_cli.positive_int,
    default=None,
    help='processes in the job; alone, starts them all on this machine'
    f' (default: ${cluster.ENV_NUM_PROCESSES}, else 1)',
  )
  g.add_argument(
    '--process-id',
    type=_cli.nonnegative_int,
    default=None,
    help=f'this process, from 0 (default: ${cluster.ENV_PROCESS_ID})',
  )
  g.add_argument(
    '--coordinator-address',
    default=None,
    metavar='HOST:PORT',
    help="process 0's address, which every process connects to (default:"
    f' ${cluster.ENV_COORDINATOR})',
  )
  g.add_argument(
    '--auto-cluster',
    action='store_true',
    help='let JAX detect the cluster (SLURM, Open MPI, Kubernetes, Cloud'
    ' TPU) instead of the three flags above',
  )
  g.add_argument(
    '--cpu-devices',
    type=_cli.positive_int,
    default=4,
    help='simulated devices per process on the CPU backend (accelerator'
    ' hosts use their devices)',
  )
  g.add_argument(
    '--mesh',
    default=None,
    metavar='DATAxEXPERT',
    help='global mesh shape, e.g. 2x4 (default: the expert axis within a'
    ' process, gcd of --experts and its devices; data across)',
  )
  c = p.add_argument_group('checkpoints')
  c.add_argument(
    '--checkpoint-every',
    type=_cli.positive_int,
    default=50,
    help='steps between checkpoints (and one after the last step)',
  )
  c.add_argument(
    '--keep-checkpoints',
    type=_cli.positive_int,
    default=3,
    help='newest checkpoints kept on disk',
  )
  c.add_argument(
    '--resume',
    action='store_true',
    help='continue from the newest complete checkpoint in --out',
  )
  c.add_argument(
    '--serve',
    action='store_true',
    help='train nothing: restore the newest checkpoint in --out into this'
    ' process (expert mesh, one device, int8 PTQ) and compare the logits',
  )
  p.add_argument('--seed', type=int, default=0, help='weights and data order')
  p.add_argument(
    '--log-every',
    type=_cli.nonnegative_int,
    default=0,
    help='print "step N loss L" every N steps (process 0; 0: never)',
  )
  p.add_argument(
    '--out',
    default='results/multihost',
    help='output directory (results, plot, checkpoints/)',
  )
  return p


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the training loop needs besides the job (``train.loop``)."""

  steps: int
  checkpoint_every: int
  eval_every: int
  log_every: int
  progress: bool


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  where = cluster.from_args(args)
  if args.serve and (where.distributed or where.launcher):
    raise _cli.UsageError('--serve runs in one process; drop the cluster flags')
  if where.launcher:
    code = cluster.launch(os.path.abspath(__file__), argv, where.num_processes)
    if code:
      sys.exit(code)
    return
  cluster.initialize(where, args.cpu_devices)
  if args.serve:
    serve(args)
  else:
    train_job(args, where)


def _config(args, corpus):
  from multihost import lm

  model_cfg, train_cfg = flags.configs_from_args(args, corpus)
  moe_cfg = _cli.from_args(lm.MoEConfig, args)
  moe_cfg.check(model_cfg.layers)
  return model_cfg, train_cfg, moe_cfg


def train_job(args, where: cluster.Cluster) -> None:
  import jax
  from flax import nnx
  from multihost import checkpoints, lm, report, train

  first = jax.process_index() == 0
  corpus = data.load_corpus(args.text, seq_len=args.seq_len)
  model_cfg, train_cfg, moe_cfg = _config(args, corpus)
  n_data, n_expert = lm.parse_mesh(args.mesh, moe_cfg.experts)
  if args.batch_size % (n_data * n_expert):
    raise _cli.UsageError(
      f'--batch-size {args.batch_size} is not divisible by the mesh size'
      f' {n_data * n_expert} (a batch is split over every device)'
    )
  out_dir = _cli.prepare_out_dir(args.out)
  ckpts = checkpoints.Checkpoints(
    os.path.join(out_dir, 'checkpoints'),
    every=args.checkpoint_every,
    keep=args.keep_checkpoints,
  )
  if not args.resume and ckpts.latest_step() is not None:
    raise _cli.UsageError(
      f'{ckpts.directory} holds checkpoints (newest: step'
      f' {ckpts.latest_step()}); pass --resume, or another --out'
    )
  config = {
    'model': vars(model_cfg),
    'train': vars(train_cfg),
    'moe': vars(moe_cfg),
  }
  meta = {'seed': args.seed, 'config': config}
  mesh = lm.make_mesh(n_data, n_expert)
  if first:
    print(
      f'{jax.process_count()} process(es) x {jax.local_device_count()}'
      f' {jax.devices()[0].platform} device(s); mesh data={n_data} x'
      f' expert={n_expert}; {moe_cfg.experts} experts, top-{moe_cfg.top_k}',
      flush=True,
    )
  t_start = time.perf_counter()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(lm.RULES):
    job = train.setup(model_cfg, train_cfg, moe_cfg, mesh, args.seed)
    start, position, restore_s = 0, 0, None
    if args.resume:
      start, position, restore_s = _resume(job, ckpts, args, config, first)
    if start >= train_cfg.steps:
      raise _cli.UsageError(
        f'the newest checkpoint is step {start}; --steps {train_cfg.steps}'
        ' leaves nothing to train'
      )
    evaluator = train.Evaluator(
      job, corpus.val, model_cfg.seq_len, train_cfg.curve_windows
    )
    loop_cfg = LoopConfig(
      train_cfg.steps,
      args.checkpoint_every,
      train_cfg.eval_every,
      args.log_every,
      not args.no_progress,
    )
    logs, curve, position = train.loop(
      job,
      lm.Stream(corpus.train, model_cfg.seq_len, args.seed),
      ckpts,
      evaluator,
      loop_cfg,
      start=start,
      position=position,
      meta=meta,
      out=sys.stdout,
    )
    wait_s = ckpts.wait()
    tokens = corpus.val[: train_cfg.batch_size * model_cfg.seq_len + 1]
    tokens = data.eval_windows(tokens, model_cfg.seq_len)[: n_data * n_expert]
    reference = train.reference_logits(job, tokens[:, :-1])
    saved = ckpts.all_steps()
  ckpts.close()
  if not first:
    return
  result = {
    'experiment': 'multihost',
    'config': {**config, 'seed': args.seed},
    'corpus': corpus.info,
    'processes': jax.process_count(),
    'devices': [str(d) for d in jax.devices()],
    'mesh': {'data': n_data, 'expert': n_expert},
    'params': lm.count_params(job.params),
    'param_bytes': train.param_bytes(job),
    'resumed_from': start if args.resume else None,
    'first_step': start + 1,
    'last_step': train_cfg.steps,
    'data_position': position,
    'steps': logs['step'],
    'train_loss_per_step': logs['loss'],
    'balance_loss_per_step': logs['balance'],
    'step_seconds': logs['seconds'],
    'curve': {
      **curve,
      'points': 'intermediate: validation windows spread over the whole'
      ' split (--curve-windows); last: the whole validation split',
    },
    'checkpoint': {
      'directory': ckpts.directory,
      'steps_saved': logs['saved'],
      'kept': saved,
      'bytes': ckpts.step_bytes(train_cfg.steps),
      'save_blocking_seconds': ckpts.save_seconds,
      'final_wait_seconds': wait_s,
      'restore_seconds': restore_s,
    },
    'wall_seconds': time.perf_counter() - t_start,
  }
  result['summary'] = report.summary(result)
  np.savez(
    os.path.join(out_dir, 'reference.npz'),
    tokens=tokens[:, :-1],
    logits=reference,
    step=train_cfg.steps,
  )
  json_path = os.path.join(out_dir, 'results.json')
  _cli.write_json(json_path, result)
  png_path = os.path.join(out_dir, 'multihost.png')
  report.plot(result, png_path)
  print('\n' + report.table(result['summary']))
  print(f'\nwrote {json_path}, {png_path} and checkpoints in {ckpts.directory}')


def _resume(job, ckpts, args, config: dict, first: bool):
  """Loads the newest complete checkpoint, after checking its settings."""
  from multihost import train

  step = ckpts.latest_step()
  if step is None:
    if first:
      print(f'no checkpoint in {ckpts.directory}: starting at step 0')
    return 0, 0, None
  saved = ckpts.restore_meta(step)
  if saved['seed'] != args.seed or saved['config'] != config:
    diff = sorted(
      f'{part}.{k}'
      for part in config
      for k in config[part]
      if saved['config'][part].get(k) != config[part][k]
    )
    if saved['seed'] != args.seed:
      diff.append('seed')
    raise _cli.UsageError(
      f'checkpoint {step} in {ckpts.directory} was trained with other'
      f' settings ({", ".join(diff)}); resume with the same flags'
    )
  start, position, seconds = train.resume(job, ckpts, args.seed)
  if first:
    print(
      f'resumed from checkpoint {start} (data position {position},'
      f' restored in {seconds:.2f} s)',
      flush=True,
    )
  return start, position, seconds


def serve(args) -> None:
  """``--serve``: the newest checkpoint restored onto other topologies."""
  import jax
  from multihost import report
  from multihost import serve as serving

  path = os.path.join(args.out, 'reference.npz')
  if not os.path.exists(path):
    raise _cli.UsageError(
      f'no {path}: train first (the training run writes it with its last'
      ' checkpoint)'
    )
  with np.load(path) as f:
    reference = dict(f)
  try:
    result = serving.check(os.path.join(args.out, 'checkpoints'), reference)
  except ValueError as e:
    raise _cli.UsageError(str(e)) from None
  print(
    f'checkpoint {result["step"]} restored into one process with'
    f' {jax.device_count()} {jax.devices()[0].platform} device(s); logits'
    " compared with the training job's on the same tokens:\n"
  )
  print(report.serve_table(result['layouts']))
  print(
    f'\nexpert kernel served as {result["expert_kernel_dtype"]}'
    f' {tuple(result["expert_kernel_shape"])}'
  )
  json_path = os.path.join(args.out, 'serve.json')
  _cli.write_json(json_path, result)
  print(f'wrote {json_path}')
  if not all(r['params_equal_one_device'] for r in result['layouts']):
    raise _cli.CheckFailed('the layouts restored different parameters')


if __name__ == '__main__':
  sys.exit(_cli.run_main('multihost.py', main))
