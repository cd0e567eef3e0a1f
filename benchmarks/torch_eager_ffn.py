"""PyTorch eager train-step time of the SwiGLU FFN (worker of ffn.py).

Run by ``benchmarks/ffn.py`` in a subprocess, possibly with another Python
that has torch installed, so that ffn.py itself never imports torch. Prints
one JSON line ``{dtype: [seconds of each step]}``.
"""

from __future__ import annotations

import argparse
import json
import time


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def torch_worker(a: argparse.Namespace) -> dict[str, list[float]]:
  """Times ``--repeats`` eager train steps per dtype after one warm-up."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  out = {}
  for name in a.dtypes.split(','):
    dtype = getattr(torch, name)
    T, d, h = a.tokens, a.embed, a.hidden
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    ws = [
      (torch.randn(h, d) / d**0.5).to(dtype).requires_grad_(),
      (torch.randn(h, d) / d**0.5).to(dtype).requires_grad_(),
      (torch.randn(d, h) / h**0.5).to(dtype).requires_grad_(),
    ]

    def step(x=x, ws=ws):
      for t in (x, *ws):
        t.grad = None
      wg, wu, wd = ws
      y = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
      (y.float() ** 2).mean().backward()

    step()
    out[name] = [_timed(step) for _ in range(a.repeats)]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tokens', type=int, required=True)
  p.add_argument('--embed', type=int, required=True)
  p.add_argument('--hidden', type=int, required=True)
  p.add_argument('--dtypes', required=True)
  p.add_argument('--repeats', type=int, default=1)
  print(json.dumps(torch_worker(p.parse_args())))


if __name__ == '__main__':
  main()
