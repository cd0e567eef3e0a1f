"""The character-level LM of ``glu_variants.py`` trained on a device mesh.

The mesh has two axes, ``data`` and ``model``. flaxact's layers name their
parameter axes (``embed``, ``mlp``); a rule set exported by
``flaxact.nnx`` maps those names onto the mesh, and this example adds two
rules of its own for the attention heads and the vocabulary. The script
prints how many parameter bytes each device holds, trains the sharded model,
then trains the same seed on a single device and checks that the losses
match.

It runs on whatever devices exist: a TPU or GPU host, or CPU devices
simulated with an XLA flag::

  export XLA_FLAGS=--xla_force_host_platform_device_count=8
  python examples/sharded_training.py --text PATH

Writes ``results.json`` and ``loss.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import _cli
import jax
import numpy as np
from charlm import data, flags, model, train
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flaxact.nnx as fnnx

RULE_SETS = {
  'tp': fnnx.TENSOR_PARALLEL_RULES,
  'fsdp': fnnx.FSDP_RULES,
  'fsdp_tp': fnnx.FSDP_TENSOR_PARALLEL_RULES,
}


def model_rules(name: str) -> tuple[tuple[str, str | None], ...]:
  """The rule set ``name`` of flaxact plus rules for this model's axes.

  Attention heads are split like the FFN's hidden width (Megatron: over
  ``'model'`` when ``mlp`` is); the small character vocabulary is
  replicated.
  """
  rules = tuple(RULE_SETS[name])
  return (*rules, ('heads', dict(rules)['mlp']), ('vocab', None))


def build_parser() -> argparse.ArgumentParser:
  p = _cli.Parser(
    prog='sharded_training.py',
    description=(
      'Train the character-level LM of glu_variants.py on a (data, model)'
      ' device mesh with a flaxact rule set, print the parameter bytes per'
      ' device, and check the loss against a single-device run of the same'
      ' seed. Without --text it uses the built-in corpus (standard-library'
      ' source; see glu_variants.py --help). On a CPU-only machine, simulate'
      ' devices with XLA_FLAGS=--xla_force_host_platform_device_count=8.'
    ),
    formatter_class=_cli.HelpFormatter,
  )
  flags.add_common_flags(p, steps=100)
  p.add_argument(
    '--variant',
    default='swiglu',
    choices=list(model.VARIANTS),
    help='the FFN variant to train',
  )
  p.add_argument(
    '--rules',
    default='fsdp_tp',
    choices=list(RULE_SETS),
    help='tensor parallel, FSDP, or both',
  )
  p.add_argument(
    '--mesh',
    default=None,
    metavar='DATAxMODEL',
    help='mesh shape, e.g. 4x2 (default: model 2 when the device count is'
    ' even and the rules split mlp, data the rest)',
  )
  p.add_argument(
    '--seed', type=int, default=0, help='initial weights and batch order'
  )
  p.add_argument(
    '--rtol',
    type=_cli.nonnegative_float,
    default=1e-3,
    help='largest relative difference of any step loss that counts as a match',
  )
  p.add_argument(
    '--out',
    default='results/sharded_training',
    help='output directory for results.json and loss.png',
  )
  return p


def mesh_shape(spec: str | None, n: int, rules: str) -> tuple[int, int]:
  """``(data, model)`` from ``'DxM'``, or a default for ``n`` devices."""
  if spec is None:
    n_model = 2 if n % 2 == 0 and rules != 'fsdp' else 1
    return n // n_model, n_model
  try:
    n_data, n_model = (int(v) for v in spec.lower().split('x'))
  except ValueError:
    raise _cli.UsageError(
      f'--mesh {spec!r} is not of the form DATAxMODEL, e.g. 4x2'
    ) from None
  if n_data < 1 or n_model < 1 or n_data * n_model > n:
    raise _cli.UsageError(
      f'--mesh {spec} needs {n_data * n_model} devices; {n} available'
    )
  return n_data, n_model


def check_divisible(args, n_data: int, n_model: int) -> None:
  """Every sharded dimension must split evenly over its mesh axis."""
  hidden = model.hidden_features(args.d_model, model.VARIANTS[args.variant][0])
  checks = [
    ('--batch-size', args.batch_size, n_data, 'data'),
    ('--heads', args.heads, n_model, 'model'),
    ('the FFN hidden width', hidden, n_model, 'model'),
  ]
  if args.rules != 'tp':
    checks.append(('--d-model', args.d_model, n_data, 'data'))
  for what, size, parts, axis in checks:
    if size % parts:
      raise _cli.UsageError(
        f'{what} ({size}) is not divisible by the {axis} axis ({parts})'
      )


def bytes_per_device(tree) -> dict[str, int]:
  """Bytes of ``tree``'s arrays that each device holds."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      key = str(shard.device)
      out[key] = out.get(key, 0) + shard.data.nbytes
  return out


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  devices = jax.devices()
  n_data, n_model = mesh_shape(args.mesh, len(devices), args.rules)
  check_divisible(args, n_data, n_model)
  corpus = data.load_corpus(args.text, seq_len=args.seq_len)
  configs = flags.configs_from_args(args, corpus)
  out_dir = _cli.prepare_out_dir(args.out)
  mesh = jax.make_mesh(
    (n_data, n_model),
    ('data', 'model'),
    (AxisType.Auto, AxisType.Auto),
    devices=devices[: n_data * n_model],
  )
  rules = model_rules(args.rules)
  print(
    f'{len(devices)} {devices[0].platform} device(s); mesh data={n_data} x'
    f' model={n_model}; rules {args.rules}: {dict(rules)}'
  )
  if len(devices) == 1:
    print(
      'only one device: set XLA_FLAGS=--xla_force_host_platform_device_count'
      '=8 to simulate eight'
    )
  sharded, single, placed = train_both(args, corpus, configs, mesh, rules)
  specs = print_layout(placed)
  rel = print_losses(args, sharded, single)
  match = bool(np.all(rel <= args.rtol))
  result = {
    'experiment': 'sharded_training',
    'config': {
      'model': vars(configs[0]),
      'train': vars(configs[1]),
      'variant': args.variant,
      'seed': args.seed,
    },
    'corpus': corpus.info,
    'devices': [str(d) for d in devices],
    'mesh': {'data': n_data, 'model': n_model},
    'rules': [list(r) for r in rules],
    'param_specs': specs,
    'param_bytes_total': placed['total'],
    'param_bytes_per_device': placed['per_device'],
    'max_relative_loss_difference': float(rel.max()),
    'rtol': args.rtol,
    'match': match,
    'sharded': sharded,
    'single_device': single,
  }
  json_path = os.path.join(out_dir, 'results.json')
  _cli.write_json(json_path, result)
  png_path = os.path.join(out_dir, 'loss.png')
  losses = [np.array(r['train_loss_per_step']) for r in (sharded, single)]
  plot(*losses, n_data, n_model, png_path)
  print(f'\nwrote {json_path} and {png_path}')
  if not match:
    raise _cli.CheckFailed(
      f'sharded and single-device losses differ by {rel.max():.2e}'
      f' (relative), more than --rtol {args.rtol:g}'
    )


def train_both(args, corpus, configs, mesh, rules):
  """Trains on the mesh, then the same seed on one device.

  Returns:
    Both runs' results, and what placing the parameters measured: bytes per
    device, total bytes and every parameter's ``PartitionSpec``.
  """
  placed = {}

  def place(params):
    # Logical names -> mesh axes, by the rules (the active context's).
    with nnx.logical_axis_rules(rules):
      shardings = nnx.get_named_sharding(params, mesh)
    params = jax.device_put(params, shardings)
    # Measured now: training donates (frees) these buffers.
    placed['per_device'] = bytes_per_device(params)
    placed['total'] = sum(x.nbytes for x in jax.tree.leaves(params))
    placed['specs'] = jax.tree.map(lambda s: s.spec, shardings)
    return params, shardings, NamedSharding(mesh, P('data', None))

  def fit(desc, placement=None):
    return train.fit(
      corpus,
      *configs,
      args.variant,
      args.seed,
      placement=placement,
      desc=desc,
      progress=not args.no_progress,
    )

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharded = fit('sharded', train.Placement(place))
  return sharded, fit('single device'), placed


def print_layout(placed) -> dict[str, str]:
  """Prints the bytes per device and the parameters' layouts; returns them."""
  total = placed['total']
  print(f'\nparameter bytes per device ({total:,} bytes unsharded):\n')
  print(
    _cli.format_table(
      ['device', 'parameter bytes', 'share of all'],
      [
        (d, f'{b:,}', f'{b / total:.1%}')
        for d, b in placed['per_device'].items()
      ],
    )
  )
  specs = {
    jax.tree_util.keystr(path, simple=True, separator='/'): str(spec)
    for path, spec in jax.tree_util.tree_leaves_with_path(
      placed['specs'], is_leaf=lambda x: isinstance(x, P)
    )
  }
  print('\nparameter layouts (blocks 1+ as block 0):\n')
  print(
    _cli.format_table(
      ['parameter', 'mesh axes'],
      [
        (k.removesuffix('/value'), v)
        for k, v in specs.items()
        if not k.startswith('blocks/') or k.startswith('blocks/0/')
      ],
    )
  )
  return specs


def print_losses(args, sharded, single) -> np.ndarray:
  """Prints both runs' losses; returns each step's relative difference."""
  a = np.array(sharded['train_loss_per_step'])
  b = np.array(single['train_loss_per_step'])
  rel = np.abs(a - b) / np.abs(b)
  print(
    f'\n{args.variant}, seed {args.seed}, {args.steps} steps: sharded vs'
    ' single-device training loss\n'
  )
  print(
    _cli.format_table(
      ['run', 'first loss (nats)', 'final train (bpc)', 'val (bpc)'],
      [
        (
          name,
          f'{r["train_loss_per_step"][0]:.6f}',
          f'{r["final_train_bpc"]:.6f}',
          f'{r["val_bpc"]:.6f}',
        )
        for name, r in (('sharded', sharded), ('single device', single))
      ],
    )
  )
  match = bool(np.all(rel <= args.rtol))
  print(
    f'\nlargest relative difference of a step loss: {rel.max():.2e}'
    f' (step {int(rel.argmax()) + 1}); {"MATCH" if match else "MISMATCH"}'
    f' at rtol {args.rtol:g}'
  )
  return rel


def plot(sharded, single, n_data: int, n_model: int, path: str) -> None:
  """Both loss curves, and their relative difference."""
  plt = _cli.pyplot()
  steps = np.arange(1, len(single) + 1)
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  a1.plot(steps, single / math.log(2), label='single device')
  a1.plot(steps, sharded / math.log(2), '--', label=f'mesh {n_data}x{n_model}')
  a1.set_xlabel('step')
  a1.set_ylabel('training loss (bits per character)')
  a1.legend()
  a2.semilogy(steps, np.abs(sharded - single) / single + 1e-12)
  a2.set_xlabel('step')
  a2.set_ylabel('relative difference')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  sys.exit(_cli.run_main('sharded_training.py', main))
