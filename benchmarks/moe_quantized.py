"""Quantized ``MoE`` layers against the float ``'loop'`` layer, Linen and NNX.

For one layer shape (``--shape T,d,hidden,E,k``; issue 18's goals are at
2048,256,512,8,2), each framework's ``MoE`` is timed and measured as:

- ``float_step``: the float layer's train step (``jax.value_and_grad`` of
  ``mean(y**2)`` with respect to the parameters and the input), ``'loop'``,
  dropless: the baseline;
- ``qat_step``: the same step under Qwix int8 QAT (weights and activations,
  every module but the router), ``impl='auto'``;
- ``float_fwd``: the float layer's forward, ``'loop'``;
- ``ptq_fwd``: the Qwix int8 PTQ layer's forward (weights, every module but
  the router), ``impl='auto'`` (the grouped impl with the int8 kernels);
- ``ptq_dense_fwd``: the same PTQ weights through ``impl='dense'`` (what
  Qwix computes on its own, every expert on every token).

It prints, per framework, the ratios issue 18 sets goals for: ``qat_step /
float_step`` (goal <= 1.3), ``ptq_fwd / float_fwd`` (goal <= 1.3), the PTQ
layer's expert weight bytes over the float layer's (from the parameters'
``nbytes``; goal <= 0.3), and the largest difference between the PTQ
layer's output through ``'auto'`` and through ``'dense'`` relative to the
largest output (``'auto'`` must equal the dense quantized formulation within
float32 rounding), plus the compiled temp memory of each row.

Method (that of ``benchmarks/moe.py``, whose helpers this imports): every
row is compiled once and warmed up, rounds are interleaved, medians and
minima reported, ratios taken within the run; ``/proc/loadavg`` is read
before and after, and above ``--max-load`` (0.5 per core) the script
refuses to run unless ``--allow-busy`` (figures then marked as taken under
load, never to be published).

Usage (from the repository root)::

  PYTHONPATH=. python benchmarks/moe_quantized.py --json moe_quantized.json
  PYTHONPATH=. python benchmarks/moe_quantized.py --quick --allow-busy
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.timing import add_load_args, check_quiet, finish_load, rounds

SHAPE = '2048,256,512,8,2'  # tokens, d, hidden, experts, k
QUICK = '128,32,64,4,2'
#: every module but the router (int8 router activations move the choices)
MODULE_PATH = '^(?!router).*'
EXPERTS = ('gate_proj', 'up_proj', 'down_proj')
GOALS = {'qat_step': 1.3, 'ptq_fwd': 1.3, 'ptq_weight_bytes': 0.3}


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default=None, help=f'T,d,hidden,E,k ({SHAPE})')
  p.add_argument('--frameworks', default='linen,nnx')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--quick', action='store_true', help='tiny shape, 2 rounds')
  p.add_argument('--json', help='write all figures to this path')
  add_load_args(p)
  a = p.parse_args(argv)
  a.shape = tuple(
    int(n) for n in (a.shape or (QUICK if a.quick else SHAPE)).split(',')
  )
  if len(a.shape) != 5:
    p.error(f'--shape needs T,d,hidden,E,k; got {a.shape}')
  if a.quick:
    a.repeats = 2
  return a


def _rules():
  import qwix

  qat = qwix.QtRule(
    module_path=MODULE_PATH, weight_qtype='int8', act_qtype='int8'
  )
  ptq = qwix.QuantizationRule(module_path=MODULE_PATH, weight_qtype='int8')
  return qwix.QtProvider([qat]), qwix.PtqProvider([ptq])


def _expert_bytes(params):
  import jax

  return sum(a.nbytes for n in EXPERTS for a in jax.tree.leaves(params[n]))


def linen_cases(shape):
  """``(fns, args, expert bytes)``: the rows' jitted functions, Linen."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import qwix

  from flaxact import linen as fl

  t, d, h, e, k = shape
  x = jax.random.normal(jax.random.key(0), (t, d))
  qat, ptq = _rules()
  float_layer = fl.MoE(h, e, k, impl='loop')
  params = nn.unbox(float_layer.init(jax.random.key(1), x))['params']
  qat_layer = qwix.quantize_model(fl.MoE(h, e, k), qat)
  qat_params = nn.unbox(qat_layer.init(jax.random.key(1), x))['params']
  ptq_layer = qwix.quantize_model(fl.MoE(h, e, k), ptq)
  ptq_dense = qwix.quantize_model(fl.MoE(h, e, k, impl='dense'), ptq)
  abstract = jax.eval_shape(ptq_layer.init, jax.random.key(1), x)
  qparams = qwix.quantize_params(params, abstract['params'])

  def step(layer):
    def loss(p, x):
      return jnp.mean(layer.apply({'params': p}, x) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1))

  fwd = lambda layer: lambda p, x: layer.apply({'params': p}, x)
  fns = {
    'float_step': (step(float_layer), (params, x)),
    'qat_step': (step(qat_layer), (qat_params, x)),
    'float_fwd': (fwd(float_layer), (params, x)),
    'ptq_fwd': (fwd(ptq_layer), (qparams, x)),
    'ptq_dense_fwd': (fwd(ptq_dense), (qparams, x)),
  }
  nbytes = {'float': _expert_bytes(params), 'ptq': _expert_bytes(qparams)}
  return fns, nbytes


def nnx_cases(shape):
  """``(fns, args, expert bytes)``: the rows' jitted functions, NNX."""
  import jax
  import jax.numpy as jnp
  import qwix
  from flax import nnx

  from flaxact import nnx as fx

  t, d, h, e, k = shape
  x = jax.random.normal(jax.random.key(0), (t, d))
  qat, ptq = _rules()
  layer = fx.MoE(d, h, e, k, impl='loop', rngs=nnx.Rngs(1))
  auto = fx.MoE(d, h, e, k, rngs=nnx.Rngs(1))
  qat_model = qwix.quantize_model(auto, qat, x)
  ptq_model = qwix.quantize_model(auto, ptq, x)

  def split(model):
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state

  def step(model):
    call, state = split(model)
    loss = lambda s, x: jnp.mean(call(s, x) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1)), state

  float_step, float_state = step(layer)
  qat_step, qat_state = step(qat_model)
  float_fwd, _ = split(layer)
  ptq_fwd, ptq_state = split(ptq_model)
  ptq_model.impl = 'dense'
  ptq_dense_fwd, dense_state = split(ptq_model)
  fns = {
    'float_step': (float_step, (float_state, x)),
    'qat_step': (qat_step, (qat_state, x)),
    'float_fwd': (float_fwd, (float_state, x)),
    'ptq_fwd': (ptq_fwd, (ptq_state, x)),
    'ptq_dense_fwd': (ptq_dense_fwd, (dense_state, x)),
  }
  pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
  nbytes = {
    'float': _expert_bytes(pure(layer)),
    'ptq': _expert_bytes(pure(ptq_model)),
  }
  return fns, nbytes


def measure(framework, shape, repeats):
  """One framework's rows: times, temp memory and the goal ratios."""
  import jax
  import jax.numpy as jnp

  fns, nbytes = (linen_cases if framework == 'linen' else nnx_cases)(shape)
  compiled, temp, outs = {}, {}, {}
  for name, (f, args) in fns.items():
    c = jax.jit(f).lower(*args).compile()
    temp[name] = c.memory_analysis().temp_size_in_bytes
    outs[name] = jax.block_until_ready(c(*args))  # warm up
    compiled[name] = lambda c=c, args=args: jax.block_until_ready(c(*args))
  times = rounds(compiled, repeats)
  y, y_dense = outs['ptq_fwd'], outs['ptq_dense_fwd']
  diff = jnp.max(jnp.abs(y - y_dense)) / jnp.max(jnp.abs(y_dense))
  med = {name: t[0] for name, t in times.items()}
  return {
    'ms': times,
    'temp_bytes': temp,
    'expert_bytes': nbytes,
    'ratios': {
      'qat_step': med['qat_step'] / med['float_step'],
      'ptq_fwd': med['ptq_fwd'] / med['float_fwd'],
      'ptq_dense_fwd': med['ptq_dense_fwd'] / med['float_fwd'],
      'ptq_weight_bytes': nbytes['ptq'] / nbytes['float'],
    },
    'ptq_auto_vs_dense': float(diff),
  }


def _print(results, a):
  import jax

  t, d, h, e, k = a.shape
  print(
    f'Quantized MoE layers, {jax.default_backend()}, T={t} d={d} hidden={h}'
    f' E={e} k={k}, median of {a.repeats} interleaved rounds [min-max]'
  )
  for fw, r in results['frameworks'].items():
    print(f'-- {fw}')
    print(f'{"case":14} {"ms":>9} {"spread ms":>17} {"temp MiB":>9}')
    for name, (med, lo, hi) in r['ms'].items():
      mib = r['temp_bytes'][name] / 2**20
      print(f'{name:14} {med:9.2f} {lo:8.2f}-{hi:8.2f} {mib:9.1f}')
    for name, value in r['ratios'].items():
      goal = GOALS.get(name)
      mark = '' if goal is None else f'  goal <= {goal}'
      print(f'{fw:5} {name + " ratio":24} {value:6.3f}{mark}')
    print(
      f'{fw:5} PTQ auto vs dense, max |diff| / max |y|:'
      f' {r["ptq_auto_vs_dense"]:.2e}'
    )


def main(argv=None):
  a = _args(argv)
  import jax

  load = check_quiet(a)
  results = {
    'backend': jax.default_backend(),
    'shape': dict(
      zip(('tokens', 'd', 'hidden', 'experts', 'k'), a.shape, strict=True)
    ),
    'frameworks': {},
  }
  for fw in a.frameworks.split(','):
    if fw not in ('linen', 'nnx'):
      sys.exit(f"--frameworks takes 'linen' and 'nnx'; got {fw!r}")
    results['frameworks'][fw] = measure(fw, a.shape, a.repeats)
  _print(results, a)
  line = finish_load(load)
  results['load'] = load
  print(line)
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
