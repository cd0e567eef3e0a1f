"""Train-step time and compiled temp memory of flaxact's SwiGLU.

Compares, in one run and per dtype, flaxact's ``SwiGLU`` against

- the same FFN hand-written with three ``nn.Dense`` / ``nnx.Linear`` and
  ``silu`` (plain autodiff),
- the layer's nine matmuls alone (3 forward, 6 backward: the compute bound),
- PyTorch eager with the same shapes (when a Python with torch is given with
  ``--torch-python``, or torch is importable here; skipped otherwise),
- and the same layer under Qwix int8 QAT (``qwix.quantize_model`` with an
  int8 ``QtRule``; ``--no-qat`` skips it): step time and memory vs float,

for a single layer and for an 8-layer ``nn.scan`` / ``nnx.scan`` stack with
residual connections. A train step is ``jax.grad`` of ``mean(y**2)`` with
respect to the parameters and the input. Times are the minimum over
``--repeats`` interleaved rounds (order shuffled each round), medians and
minima reported, ratios of medians (ratios of minima beside them); memory is
``compiled.memory_analysis().temp_size_in_bytes``, which is deterministic.
The load average is read before and after (``benchmarks/timing.py``): above
``--max-load`` the script refuses to run unless ``--allow-busy``. This
process never imports torch: the eager column runs in a child process after
the JAX rounds.

Usage::

  python benchmarks/ffn.py                       # the issue's sizes
  python benchmarks/ffn.py --quick               # a small smoke run
  python benchmarks/ffn.py --json out.json --torch-python /tmp/tv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.timing import add_load_args, check_quiet, finish_load, rounds

GOALS = {
  'stack_memory': 0.45,  # flaxact / hand-written, 8-layer stack, at most
  'stack_time': 0.75,  # flaxact / hand-written, 8-layer stack, at most
  'single_vs_matmul': 1.10,  # flaxact / nine matmuls, single layer, at most
  'torch_speedup': 1.5,  # torch eager / flaxact, single layer, at least
}


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tokens', type=int, default=4096)
  p.add_argument('--embed', type=int, default=1024)
  p.add_argument('--hidden', type=int, default=2816)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument(
    '--quick', action='store_true', help='T=256, d=128, h=352, 2 repeats'
  )
  p.add_argument('--json', help='write all figures to this path')
  p.add_argument(
    '--torch-python',
    help='a Python interpreter with torch installed, for the eager column',
  )
  p.add_argument('--no-torch', action='store_true')
  p.add_argument(
    '--no-qat', action='store_true', help='skip the Qwix int8 QAT rows'
  )
  add_load_args(p)
  a = p.parse_args(argv)
  if a.quick:
    a.tokens, a.embed, a.hidden, a.repeats = 256, 128, 352, 2
  return a


# ---------------------------------------------------------------------------
# PyTorch eager (torch_eager_ffn.py in a subprocess: this file needs no torch)
# ---------------------------------------------------------------------------


def _torch_times(a: argparse.Namespace) -> dict[str, list[float]] | None:
  """``{dtype: [seconds per step]}`` from the eager worker, or None."""
  if a.no_torch:
    return None
  argv = [
    f'--tokens={a.tokens}',
    f'--embed={a.embed}',
    f'--hidden={a.hidden}',
    f'--dtypes={a.dtypes}',
    f'--repeats={a.repeats}',
  ]
  python = a.torch_python
  if python is None:
    import importlib.util

    if importlib.util.find_spec('torch') is None:
      return None
    python = sys.executable
  worker = os.path.join(os.path.dirname(__file__), 'torch_eager_ffn.py')
  result = subprocess.run(
    [python, worker, *argv], capture_output=True, text=True, check=True
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------


def build(a: argparse.Namespace, dtype_name: str) -> dict[str, Any]:
  """Compiles every JAX case; returns {case: (step, args, temp bytes)}."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from flaxact import linen as fl
  from flaxact import nnx as fx

  T, d, h, L = a.tokens, a.embed, a.hidden, a.layers
  dtype = jnp.dtype(dtype_name)
  x = jax.random.normal(jax.random.key(0), (T, d)).astype(dtype)

  class HandLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = dict(use_bias=False, dtype=x.dtype)
      g = nn.Dense(h, name='gate_proj', **dense)(x)
      u = nn.Dense(h, name='up_proj', **dense)(x)
      return nn.Dense(d, name='down_proj', **dense)(nn.silu(g) * u)

  class HandNNX(nnx.Module):
    def __init__(self, rngs):
      kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
      self.gate_proj = nnx.Linear(d, h, **kw)
      self.up_proj = nnx.Linear(d, h, **kw)
      self.down_proj = nnx.Linear(h, d, **kw)

    def __call__(self, x):
      return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))

  class Block(nn.Module):
    ours: bool

    @nn.compact
    def __call__(self, x, _):
      return x + (fl.SwiGLU(h) if self.ours else HandLinen())(x), None

  def loss_of(apply):
    def loss(p, x):
      return jnp.mean(apply(p, x).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  def linen_case(module, extra=()):
    v = nn.unbox(module.init(jax.random.key(0), x, *extra))['params']
    step = loss_of(lambda p, x: _first(module.apply({'params': p}, x, *extra)))
    return step, (v, x)

  def nnx_stack_case(ours):
    meta = {nnx.PARTITION_NAME: 'layers'}

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=meta)
    def create(rngs):
      return fx.SwiGLU(d, h, rngs=rngs) if ours else HandNNX(rngs)

    graphdef, state = nnx.split(create(nnx.Rngs(0)))

    def apply(state, x):
      @nnx.scan(
        in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=meta
      )
      def forward(x, layer):
        return x + layer(x)

      return forward(x, nnx.merge(graphdef, state))

    return loss_of(apply), (state, x)

  def nine_matmuls():
    ks = jax.random.split(jax.random.key(1), 7)
    wg, wu = (jax.random.normal(k, (d, h), dtype) for k in ks[:2])
    wd = jax.random.normal(ks[2], (h, d), dtype)
    hid, dg, du = (jax.random.normal(k, (T, h), dtype) for k in ks[3:6])
    dy = jax.random.normal(ks[6], (T, d), dtype)

    @jax.jit
    def f(x, wg, wu, wd, hid, dy, dg, du):
      return (
        x @ wg,  # forward: gate
        x @ wu,  # forward: up
        hid @ wd,  # forward: down
        dy @ wd.T,  # backward: d hidden
        hid.T @ dy,  # backward: d down kernel
        x.T @ dg,  # backward: d gate kernel
        x.T @ du,  # backward: d up kernel
        dg @ wg.T + du @ wu.T,  # backward: d x (two matmuls)
      )

    return f, (x, wg, wu, wd, hid, dy, dg, du)

  stack = lambda ours: nn.scan(
    Block,
    variable_axes={'params': 0},
    split_rngs={'params': True},
    length=L,
    metadata_params={nn.PARTITION_NAME: 'layers'},
  )(ours)
  cases = {
    'single_ours': linen_case(fl.SwiGLU(h)),
    'single_hand': linen_case(HandLinen()),
    'single_matmuls': nine_matmuls(),
    'linen_stack_ours': linen_case(stack(True), (None,)),
    'linen_stack_hand': linen_case(stack(False), (None,)),
    'nnx_stack_ours': nnx_stack_case(True),
    'nnx_stack_hand': nnx_stack_case(False),
  }
  if not a.no_qat:
    import qwix

    rule = qwix.QtRule(module_path='.*', weight_qtype='int8', act_qtype='int8')
    qat = qwix.quantize_model(fl.SwiGLU(h), qwix.QtProvider([rule]))
    cases['single_qat'] = linen_case(qat)  # same layer, int8 QAT
  built = {}
  for name, (step, args) in cases.items():
    compiled = step.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    built[name] = (compiled, args, temp)
  return built


def _first(y):
  return y[0] if isinstance(y, tuple) else y


def run(a: argparse.Namespace) -> dict[str, Any]:
  """Measures everything; returns the figures."""
  import jax

  dtypes = a.dtypes.split(',')
  built = {dt: build(a, dt) for dt in dtypes}
  fns = {
    f'{dt}/{name}': (lambda c=compiled, a=args: jax.block_until_ready(c(*a)))
    for dt in dtypes
    for name, (compiled, args, _) in built[dt].items()
  }
  timed = rounds(fns, a.repeats)  # ms: (median, min, max)
  torch_times = _torch_times(a)  # after the JAX rounds, in a child process
  figures: dict[str, Any] = {
    'config': {
      'tokens': a.tokens,
      'embed': a.embed,
      'hidden': a.hidden,
      'layers': a.layers,
      'repeats': a.repeats,
      'jax': jax.__version__,
      'devices': str(jax.devices()),
    },
    'goals': GOALS,
  }
  pairs = {
    'single_time_vs_hand': ('single_ours', 'single_hand'),
    'single_vs_matmul': ('single_ours', 'single_matmuls'),
    'linen_stack_time': ('linen_stack_ours', 'linen_stack_hand'),
    'nnx_stack_time': ('nnx_stack_ours', 'nnx_stack_hand'),
    'qat_time_vs_float': ('single_qat', 'single_ours'),
  }
  for dt in dtypes:
    med = {n: timed[f'{dt}/{n}'][0] / 1e3 for n in built[dt]}
    low = {n: timed[f'{dt}/{n}'][1] / 1e3 for n in built[dt]}
    mem = {name: built[dt][name][2] for name in built[dt]}
    r: dict[str, Any] = {'time_s': med, 'min_time_s': low, 'temp_bytes': mem}
    for key, (num, den) in pairs.items():
      if num in med:
        r[key] = med[num] / med[den]
        r[key + '_min'] = low[num] / low[den]
    r['single_memory_vs_hand'] = mem['single_ours'] / mem['single_hand']
    for kind in ('linen', 'nnx'):
      ours, hand = mem[f'{kind}_stack_ours'], mem[f'{kind}_stack_hand']
      r[f'{kind}_stack_memory'] = ours / hand
    if 'single_qat' in mem:
      r['qat_memory_vs_float'] = mem['single_qat'] / mem['single_ours']
    if torch_times is not None and dt in torch_times:
      steps = sorted(torch_times[dt])
      r['torch_eager_s'] = steps[len(steps) // 2]
      r['torch_speedup'] = r['torch_eager_s'] / med['single_ours']
      r['torch_speedup_min'] = steps[0] / low['single_ours']
    figures[dt] = r
  return figures


def table(f: dict[str, Any]) -> str:
  """A Markdown table of the figures."""
  c = f['config']
  lines = [
    f'T={c["tokens"]} tokens, d={c["embed"]}, hidden={c["hidden"]},'
    f' {c["layers"]}-layer stacks; medians of {c["repeats"]} interleaved'
    ' rounds (ratio of minima in brackets).',
    '',
    '| dtype | measure | flaxact | baseline | ratio | goal |',
    '|---|---|---|---|---|---|',
  ]
  mib = 2.0**20
  for dt, r in f.items():
    if dt in ('config', 'goals'):
      continue
    t, m = r['time_s'], r['temp_bytes']
    rows = [
      ('single layer time vs hand-written', t['single_ours'],
       t['single_hand'], r['single_time_vs_hand'], '', 's',
       r['single_time_vs_hand_min']),
      ('single layer time vs 9 matmuls', t['single_ours'],
       t['single_matmuls'], r['single_vs_matmul'], '<= 1.10', 's',
       r['single_vs_matmul_min']),
      ('single layer temp memory', m['single_ours'] / mib,
       m['single_hand'] / mib, r['single_memory_vs_hand'], '', 'MiB'),
      ('8-layer nn.scan time', t['linen_stack_ours'], t['linen_stack_hand'],
       r['linen_stack_time'], '<= 0.75', 's', r['linen_stack_time_min']),
      ('8-layer nn.scan temp memory', m['linen_stack_ours'] / mib,
       m['linen_stack_hand'] / mib, r['linen_stack_memory'], '<= 0.45', 'MiB'),
      ('8-layer nnx.scan time', t['nnx_stack_ours'], t['nnx_stack_hand'],
       r['nnx_stack_time'], '<= 0.75', 's', r['nnx_stack_time_min']),
      ('8-layer nnx.scan temp memory', m['nnx_stack_ours'] / mib,
       m['nnx_stack_hand'] / mib, r['nnx_stack_memory'], '<= 0.45', 'MiB'),
    ]  # fmt: skip
    if 'qat_time_vs_float' in r:
      rows += [
        ('Qwix int8 QAT step time vs float', t['single_qat'],
         t['single_ours'], r['qat_time_vs_float'], '', 's',
         r['qat_time_vs_float_min']),
        ('Qwix int8 QAT temp memory vs float', m['single_qat'] / mib,
         m['single_ours'] / mib, r['qat_memory_vs_float'], '', 'MiB'),
      ]  # fmt: skip
    if 'torch_eager_s' in r:
      rows.append((
        'single layer time vs PyTorch eager', t['single_ours'],
        r['torch_eager_s'], 1 / r['torch_speedup'], '<= 0.67 (1.5x)', 's',
        1 / r['torch_speedup_min'],
      ))  # fmt: skip
    for name, ours, base, ratio, goal, unit, *low in rows:
      spread = f' [{low[0]:.2f}x]' if low else ''
      lines.append(
        f'| {dt} | {name} | {ours:.4g} {unit} | {base:.4g} {unit} |'
        f' {ratio:.2f}x{spread} | {goal} |'
      )
  return '\n'.join(lines)


def main(argv=None) -> None:
  a = _args(argv)
  load = check_quiet(a)
  figures = run(a)
  print(table(figures))
  print(finish_load(load))
  figures['load'] = load
  if a.json:
    with open(a.json, 'w') as fh:
      json.dump(figures, fh, indent=2)


if __name__ == '__main__':
  main()
