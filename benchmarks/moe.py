"""Forward+backward time of the routed FFN (``flaxact.moe_ffn``) per impl.

For each shape, measured in one run with interleaved rounds (the machine may
be shared: medians and the min-max spread are reported):

- ``dense``: the dense bound, a plain gated FFN over ``T·k`` tokens of the
  same widths (the MoE layer's active FLOPs, no routing);
- ``floor``: a perfectly balanced batched gated FFN over the experts,
  ``(E, T·k/E, d)``, no routing and no padding;
- ``routing``: the routing step alone, forward and backward: router
  matmul, top-k, the sorted layout and the auxiliary losses (the dispatch
  gathers and the combine are fused into the ``'loop'`` tiles, so they
  count in that row);
- each ``impl`` of :func:`flaxact.moe_ffn` (router included);
- ``nnx_layer`` and ``linen_layer``: the ``MoE`` layers with their default
  options (``impl='auto'``, remat on) holding the ``moe_ffn`` rows' weights
  (so every row routes the same tokens to the same experts), gradients with
  respect to the parameters and the input;
- the ``MoE`` layer's train step (``--layer-shape``; ``--no-layer`` skips
  it): ``jax.value_and_grad`` of ``mean(y**2)`` over a Linen
  ``flaxact.linen.MoE`` with respect to its parameters and the input, jitted,
  for the float layer with ``impl='loop'`` (the CPU default) and
  ``impl='dense'`` and for the layer under Qwix int8 QAT (weights and
  activations, every module but the router; ``impl='auto'``), and
  ``'dense'``/QAT again with ``capacity_factor=1.25`` (each expert computes
  its capacity slots only): step time and compiled temp memory
  (``memory_analysis()``) as ratios to float dropless ``'loop'``;
- Hugging Face ``transformers``' MoE blocks (Mixtral for coarse, Qwen3-MoE
  for fine) with each ``experts_implementation``, against PyTorch's own
  dense bound, when ``--torch-python`` names a Python with torch and
  transformers (run in a worker process; this file never imports torch).

Every step is ``jax.grad`` of ``sum(y * c)`` for a fixed random ``c``, with
respect to the input and every weight, float32. Each row also reports the
compiled step's temp memory (XLA ``memory_analysis()``, deterministic) as a
ratio to the dense bound's.

Method: a figure is a ratio taken in one run on a quiet machine. The JAX
rows run in this process, which never imports torch (torch's thread pools
distort them); the ``transformers`` rows run in a child process. Rounds are
interleaved, medians and minima reported, and ``/proc/loadavg`` is read
before and after (the reading after includes this run's own threads): above
``--max-load`` (0.5 per core) before the run the script refuses to run, or,
with ``--allow-busy``, runs and marks the figures as taken under load (never
to be published).

Usage::

  python benchmarks/moe.py --quick
  python benchmarks/moe.py --json moe.json --torch-python /path/bin/python
  python benchmarks/moe.py --shapes '' --layer-shape 2048,256,512,8,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.timing import (
  add_load_args,
  check_quiet,
  finish_load,
  rounds,
)

SHAPES = {  # name: (tokens, d, experts, k, hidden)
  'coarse': (4096, 512, 8, 2, 1024),
  'fine': (4096, 512, 64, 8, 256),
}
QUICK = {'coarse': (512, 64, 8, 2, 128), 'fine': (512, 64, 16, 4, 32)}
GOALS = {'coarse': 1.15, 'fine': 1.25}  # issue 17, quiet machine
LAYER_SHAPE = '2048,256,512,8,2'  # tokens, d, hidden, experts, k
LAYER_QUICK = '256,64,128,8,2'
#: Qwix rule of the QAT row: int8 weights and activations everywhere but the
#: router (int8 router activations can change which experts are chosen).
QAT_MODULE_PATH = '^(?!router).*'
#: capacity_factor of the capped layer rows: ``'dense'`` then computes each
#: expert's ``C`` slots only.
CAPACITY = 1.25


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--shapes', default='coarse,fine', help="'' skips the impl rows"
  )
  p.add_argument(
    '--impls',
    default='loop,tiles',
    help="comma list, or 'all' (every impl here; prints a recommendation)",
  )
  p.add_argument('--tile-size', type=int, default=None)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--quick', action='store_true', help='small shapes, 2 rounds')
  p.add_argument('--json', help='write all figures to this path')
  p.add_argument('--torch-python', help='a Python with torch + transformers')
  p.add_argument(
    '--torch-impls',
    default='eager,batched_mm,grouped_mm',
    help='transformers experts_implementation values to time',
  )
  p.add_argument(
    '--layer-shape',
    default=None,
    help=f'T,d,hidden,E,k of the layer rows (default {LAYER_SHAPE})',
  )
  p.add_argument(
    '--no-layer',
    action='store_true',
    help='skip the MoE layer train-step rows (float loop/dense, Qwix QAT)',
  )
  add_load_args(p)
  p.add_argument('--torch-worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--ep', action='store_true', help='expert-parallel bytes')
  a = p.parse_args(argv)
  a.shape_table = QUICK if a.quick else SHAPES
  a.shape_names = [name for name in a.shapes.split(',') if name]
  if a.layer_shape is None:
    a.layer_shape = LAYER_QUICK if a.quick else LAYER_SHAPE
  a.layer = tuple(int(n) for n in a.layer_shape.split(','))
  if len(a.layer) != 5:
    p.error(f'--layer-shape needs T,d,hidden,E,k; got {a.layer_shape!r}')
  if a.quick:
    a.repeats = 2
  return a


def jax_cases(shape, a):
  """``{name: zero-argument callable}`` of jitted JAX train steps."""
  import jax
  import jax.numpy as jnp

  import flaxact
  from flaxact._src.moe import dispatch
  from flaxact._src.moe.experts.api import tile_rows

  t, d, e, k, h = shape
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (t, d))
  rk = jax.random.normal(ks[1], (d, e)) * d**-0.5
  wg = jax.random.normal(ks[2], (e, d, h)) * d**-0.5
  wu = jax.random.normal(ks[3], (e, d, h)) * d**-0.5
  wd = jax.random.normal(ks[4], (e, h, d)) * h**-0.5
  c = jax.random.normal(ks[5], (t, d))
  xk = jax.random.normal(ks[6], (t * k, d))
  ck = jax.random.normal(ks[7], (t * k, d))
  cw = jax.random.normal(jax.random.key(9), (t, k))

  def ffn(x, g, u, dn):
    return flaxact.gated_product(x @ g, x @ u, 'silu') @ dn

  def dense(x, g, u, dn):
    return jnp.sum(ffn(x, g, u, dn) * ck)

  xb, cb = xk.reshape(e, -1, d), ck.reshape(e, -1, d)

  def floor(x, g, u, dn):
    hb = flaxact.gated_product(
      jnp.einsum('etd,edh->eth', x, g), jnp.einsum('etd,edh->eth', x, u)
    )
    return jnp.sum(jnp.einsum('eth,ehd->etd', hb, dn) * cb)

  def routing(x, rk):
    logits = x @ rk
    w, ex = flaxact.top_k_routing(logits, k)
    tile = tile_rows(a.tile_size, 'loop', t * k, e)  # what 'loop' uses
    layout = dispatch.make_layout(ex, e, tile)
    aux = flaxact.load_balancing_loss(logits, ex, e)
    aux = aux + flaxact.router_z_loss(logits)
    used = layout.tiles_used + layout.row_assign[0]  # keep the layout live
    return jnp.sum(w * cw) + aux + used.astype(jnp.float32)

  grad = lambda f, n: jax.jit(jax.grad(f, argnums=tuple(range(n))))
  from flax import nnx

  from flaxact import linen as fl
  from flaxact import nnx as fx

  # The layers get the weights of the moe_ffn rows, so that every row routes
  # the same way and the rows differ only by the API around the experts.
  weights = {
    'router': {'kernel': rk},
    'gate_proj': {'kernel': wg},
    'up_proj': {'kernel': wu},
    'down_proj': {'kernel': wd},
  }
  nnx_layer = fx.MoE(d, h, e, k, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nnx_layer)
  nnx.replace_by_pure_dict(state, weights)

  def nnx_step(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x) * c)

  linen_layer = fl.MoE(h, e, k)
  variables = {'params': weights}

  def linen_step(variables, x):
    return jnp.sum(linen_layer.apply(variables, x) * c)

  fns = {
    'dense': (grad(dense, 4), (xk, wg[0], wu[0], wd[0])),
    'floor': (grad(floor, 4), (xb, wg, wu, wd)),
    'routing': (grad(routing, 2), (x, rk)),
  }
  for impl in impl_names(a.impls):
    kw = {} if a.tile_size is None else {'tile_size': a.tile_size}

    def moe(x, rk, g, u, dn, impl=impl, kw=kw):
      y, _ = flaxact.moe_ffn(
        x, rk, g, u, dn, experts_per_token=k, impl=impl, **kw
      )
      return jnp.sum(y * c)

    fns[impl] = (grad(moe, 5), (x, rk, wg, wu, wd))
  fns['nnx_layer'] = (grad(nnx_step, 2), (state, x))
  fns['linen_layer'] = (grad(linen_step, 2), (variables, x))
  out, temp = {}, {}
  for name, (f, args) in fns.items():
    compiled = f.lower(*args).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm up
    out[name] = lambda c=compiled, args=args: jax.block_until_ready(c(*args))
  return out, temp


def layer_cases(shape, a):
  """``{name: (compiled step, args, temp bytes)}`` of the MoE layer rows.

  ``loop`` and ``dense`` are the float Linen ``MoE`` with that impl; ``qat``
  is the same layer (``impl='auto'``) under Qwix int8 QAT, which runs the
  grouped impl quantized as Qwix quantizes ``'dense'``
  (``benchmarks/moe_quantized.py`` has the quantized rows).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import qwix

  from flaxact import linen as fl

  del a
  t, d, h, e, k = shape
  x = jax.random.normal(jax.random.key(0), (t, d))
  rule = qwix.QtRule(
    module_path=QAT_MODULE_PATH, weight_qtype='int8', act_qtype='int8'
  )
  cap = dict(capacity_factor=CAPACITY)
  layers = {
    'loop': fl.MoE(h, e, k, impl='loop'),
    'dense': fl.MoE(h, e, k, impl='dense'),
    'qat': qwix.quantize_model(fl.MoE(h, e, k), qwix.QtProvider([rule])),
    'dense_cap': fl.MoE(h, e, k, impl='dense', **cap),
    'qat_cap': qwix.quantize_model(
      fl.MoE(h, e, k, **cap), qwix.QtProvider([rule])
    ),
  }
  built = {}
  for name, layer in layers.items():
    params = nn.unbox(layer.init(jax.random.key(1), x))['params']

    def loss(params, x, layer=layer):
      return jnp.mean(layer.apply({'params': params}, x) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, x))  # warm up
    built[name] = (compiled, (params, x), temp)
  return built


def _layer_results(a):
  """Times the layer rows; figures with ratios to float ``'loop'``."""
  import jax

  built = layer_cases(a.layer, a)
  fns = {
    name: lambda c=c, args=args: jax.block_until_ready(c(*args))
    for name, (c, args, _) in built.items()
  }
  times = rounds(fns, a.repeats)
  temp = {name: b[2] for name, b in built.items()}
  return {
    'shape': dict(
      zip(('tokens', 'd', 'hidden', 'experts', 'k'), a.layer, strict=True)
    ),
    'ms': times,
    'temp_bytes': temp,
    'time_vs_loop': {n: times[n][0] / times['loop'][0] for n in times},
    'memory_vs_loop': {n: temp[n] / temp['loop'] for n in temp},
  }


def _print_layer(r, repeats):
  s = r['shape']
  print(
    f'MoE layer train step (Linen MoE, value_and_grad, float32),'
    f' T={s["tokens"]} d={s["d"]} hidden={s["hidden"]} E={s["experts"]}'
    f' k={s["k"]}, median of {repeats} interleaved rounds'
    ' in shuffled order [min-max]'
  )
  print(
    f'{"case":24} {"ms":>9} {"spread ms":>17} {"x loop":>7}'
    f' {"temp MiB":>9} {"x loop":>7}'
  )
  labels = {
    'loop': "float impl='loop'",
    'dense': "float impl='dense'",
    'qat': 'Qwix int8 QAT (auto)',
    'dense_cap': f"float 'dense', cap {CAPACITY}",
    'qat_cap': f'Qwix int8 QAT, cap {CAPACITY}',
  }
  for name, (med, lo, hi) in r['ms'].items():
    mib = r['temp_bytes'][name] / 2**20
    print(
      f'{labels[name]:24} {med:9.1f} {lo:8.1f}-{hi:8.1f}'
      f' {r["time_vs_loop"][name]:7.2f} {mib:9.1f}'
      f' {r["memory_vs_loop"][name]:7.2f}'
    )


def torch_worker(a):
  """Times transformers' MoE blocks per experts implementation."""
  import torch
  from transformers import MixtralConfig, Qwen3MoeConfig
  from transformers.models.mixtral.modeling_mixtral import (
    MixtralSparseMoeBlock,
  )
  from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeSparseMoeBlock,
  )

  torch.manual_seed(0)
  results = {}
  for name in a.shape_names:
    t, d, e, k, h = a.shape_table[name]
    fns = {}
    xk = torch.randn(t * k, d, requires_grad=True)
    lin = [torch.nn.Linear(d, h, bias=False), torch.nn.Linear(d, h, bias=False)]
    down = torch.nn.Linear(h, d, bias=False)

    def dense(xk=xk, lin=lin, down=down):
      y = down(torch.nn.functional.silu(lin[0](xk)) * lin[1](xk))
      y.sum().backward()

    fns['dense'] = dense
    for impl in a.torch_impls.split(','):
      if name == 'coarse':
        cfg = MixtralConfig(
          hidden_size=d,
          intermediate_size=h,
          num_local_experts=e,
          num_experts_per_tok=k,
        )
        block_cls = MixtralSparseMoeBlock
      else:
        cfg = Qwen3MoeConfig(
          hidden_size=d,
          moe_intermediate_size=h,
          num_experts=e,
          num_experts_per_tok=k,
          norm_topk_prob=True,
        )
        block_cls = Qwen3MoeSparseMoeBlock
      cfg._experts_implementation = impl
      block = block_cls(cfg)
      for p in block.parameters():
        torch.nn.init.normal_(p, std=d**-0.5)
      x = torch.randn(1, t, d, requires_grad=True)

      def step(block=block, x=x):
        block(x).sum().backward()

      try:
        step()
      except Exception as err:  # an impl this torch build lacks
        print(f'skipping {impl}: {err}', file=sys.stderr)
        continue
      fns[f'hf_{impl}'] = step
    results[name] = rounds(fns, a.repeats)
  return results


def _torch_results(a):
  if not a.torch_python or not a.shape_names:
    return {}
  cmd = [
    a.torch_python,
    __file__,
    '--torch-worker',
    '--shapes',
    a.shapes,
    '--repeats',
    str(a.repeats),
    '--torch-impls',
    a.torch_impls,
  ] + (['--quick'] if a.quick else [])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'PYTHONPATH': path}  # the worker imports benchmarks.*
  done = subprocess.run(
    cmd, capture_output=True, text=True, check=False, env=env
  )
  if done.returncode:
    print(f'torch worker failed: {done.stderr[-2000:]}', file=sys.stderr)
    return {}
  return json.loads(done.stdout.strip().splitlines()[-1])


def impl_names(spec: str) -> list[str]:
  """``--impls``: a comma list, or ``'all'`` (``'tokamax'`` if installed)."""
  if spec != 'all':
    return spec.split(',')
  from flaxact._src.moe.experts import api

  if api.tokamax_available():
    from absl import flags  # tokamax parses sys.argv (ours) unless parsed

    flags.FLAGS.mark_as_parsed()
  skip = {'auto'} | (set() if api.tokamax_available() else {'tokamax'})
  return [impl for impl in api.IMPLS if impl not in skip]


def recommendation(results, impls) -> str:
  """One line: the impl with the lowest median on this device, per shape."""
  import jax

  from flaxact._src.moe.experts.api import resolve_impl

  best = {
    name: min(impls, key=lambda i, rows=rows: rows[i][0])
    for name, rows in results['shapes'].items()
  }
  picks = ', '.join(f'{name}: {impl!r}' for name, impl in best.items())
  device = f'{jax.default_backend()} ({jax.devices()[0].device_kind})'
  return (
    f'recommended impl on {device}:'
    f" {picks} (fastest median); impl='auto' picks {resolve_impl('auto')!r}"
  )


def _print_impls(results, torch_res, a):
  import jax

  print(
    f'MoE forward+backward, float32, {jax.default_backend()},'
    f' median of {a.repeats} interleaved rounds in shuffled order [min-max]'
  )
  print(
    f'{"shape":8} {"case":16} {"ms":>9} {"spread ms":>17} {"x dense":>8}'
    f' {"temp MiB":>9} {"x dense":>8}'
  )
  for name, rows in results['shapes'].items():
    shape = a.shape_table[name]
    print(
      f'-- {name}: T={shape[0]} d={shape[1]} E={shape[2]} k={shape[3]}'
      f' hidden={shape[4]}; goal <= {GOALS[name]}x dense'
    )
    for label, rows_, base in (
      ('jax', rows, rows['dense'][0]),
      (
        'torch',
        torch_res.get(name, {}),
        torch_res.get(name, {}).get('dense', (1.0,))[0],
      ),
    ):
      for case, (med, lo, hi) in rows_.items():
        tag = case if label == 'jax' else f'torch_{case}'
        mem = ''
        if label == 'jax':
          temp = results['temp_bytes'][name]
          ratio = temp[case] / max(temp['dense'], 1)
          mem = f' {temp[case] / 2**20:9.1f} {ratio:8.2f}'
        print(
          f'{name:8} {tag:16} {med:9.1f} {lo:8.1f}-{hi:8.1f}'
          f' {med / base:8.2f}{mem}'
        )
    theirs = torch_res.get(name, {}).get('hf_grouped_mm')
    if theirs:
      for layer in ('nnx_layer', 'linen_layer'):
        speedup = theirs[0] / rows[layer][0]
        print(
          f'{name:8} {layer} vs transformers grouped_mm: {speedup:.2f}x as'
          ' fast (medians, same run)'
        )


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if '--ep' in argv:  # the exchange's bytes and memory: benchmarks/moe_ep.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import moe_ep

    moe_ep.main([arg for arg in argv if arg != '--ep'])
    return
  a = _args(argv)
  if a.torch_worker:
    import torch

    torch.set_num_threads(2)
    print(json.dumps(torch_worker(a)))
    return
  import jax

  load = check_quiet(a)
  results = {'backend': jax.default_backend(), 'shapes': {}, 'temp_bytes': {}}
  for name in a.shape_names:
    fns, temp = jax_cases(a.shape_table[name], a)
    results['shapes'][name] = rounds(fns, a.repeats)
    results['temp_bytes'][name] = temp
  if 'torch' in sys.modules:
    raise RuntimeError('torch was imported into the JAX process')
  if not a.no_layer:
    results['layer'] = _layer_results(a)
  torch_res = _torch_results(a)
  if a.shape_names:
    _print_impls(results, torch_res, a)
    if a.impls == 'all':
      print(recommendation(results, impl_names(a.impls)))
  if not a.no_layer:
    _print_layer(results['layer'], a.repeats)
  results['torch'] = torch_res
  line = finish_load(load)
  results['load'] = load
  print(line)
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
