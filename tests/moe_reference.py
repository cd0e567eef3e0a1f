"""Float64 per-token references of routing and the routed FFN.

Written as plainly as possible (loops over tokens and chosen experts, numpy
float64, Python sorting) so that they are obviously the formulas of the
``transformers`` modules: Mixtral / Qwen-MoE (softmax), DeepSeek-V3
(sigmoid, correction bias, groups), GPT-OSS (router bias, clamped product).
"""

from __future__ import annotations

import math

import numpy as np


def _softmax(z):
  z = np.asarray(z, np.float64)
  p = np.exp(z - z.max())
  return p / p.sum()


def _top(scores, k):
  # ties to the lower index: sort by (-score, index)
  return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def route(
  logits,
  k,
  *,
  router='softmax',
  normalize=True,
  bias=None,
  scale=1.0,
  num_groups=None,
  groups_per_token=None,
):
  """``(weights, experts)`` lists for one token's logits."""
  logits = np.asarray(logits, np.float64)
  e = len(logits)
  if router == 'softmax':
    p = _softmax(logits)
    chosen = _top(p, k)
    w = [p[i] for i in chosen]
    if normalize:
      w = [v / sum(w) for v in w]
  else:
    s = 1 / (1 + np.exp(-logits))
    c = s + (0 if bias is None else np.asarray(bias, np.float64))
    allowed = list(range(e))
    if num_groups is not None:
      size = e // num_groups
      gs = [
        sum(sorted(c[g * size : (g + 1) * size])[-2:])
        for g in range(num_groups)
      ]
      best = _top(gs, groups_per_token)
      allowed = [i for i in range(e) if i // size in best]
    chosen = sorted(allowed, key=lambda i: (-c[i], i))[:k]
    w = [s[i] for i in chosen]
    if normalize:
      total = sum(w) + 1e-20
      w = [v / total for v in w]
  return [v * scale for v in w], chosen


def silu(v):
  return v / (1 + np.exp(-v))


def gpt_oss_glu(g, u, alpha=1.702, limit=7.0):
  g = np.minimum(g, limit)
  u = np.clip(u, -limit, limit)
  return (u + 1) * g / (1 + np.exp(-alpha * g))


def moe(
  x,
  router_kernel,
  gate,
  up,
  down,
  k,
  *,
  router_bias=None,
  biases=(None, None, None),
  product=None,
  capacity_factor=None,
  **route_kw,
):
  """``(y, experts, dropped)`` of the routed FFN, one token at a time."""
  x = np.asarray(x, np.float64)
  t, e = x.shape[0], gate.shape[0]
  product = product or (lambda g, u: silu(g) * u)
  cap = (
    None
    if capacity_factor is None
    else max(1, math.ceil(capacity_factor * t * k / e))
  )
  used = [0] * e
  y = np.zeros((t, down.shape[-1]))
  all_experts, dropped = [], []
  for i in range(t):
    logits = x[i] @ np.asarray(router_kernel, np.float64)
    if router_bias is not None:
      logits = logits + router_bias
    w, chosen = route(logits, k, **route_kw)
    all_experts.append(chosen)
    drop_row = []
    for wj, ej in zip(w, chosen, strict=True):
      used[ej] += 1
      if cap is not None and used[ej] > cap:
        drop_row.append(True)
        continue
      drop_row.append(False)
      g = x[i] @ np.asarray(gate[ej], np.float64)
      u = x[i] @ np.asarray(up[ej], np.float64)
      if biases[0] is not None:
        g, u = g + biases[0][ej], u + biases[1][ej]
      out = product(g, u) @ np.asarray(down[ej], np.float64)
      if biases[2] is not None:
        out = out + biases[2][ej]
      y[i] += wj * out
    dropped.append(drop_row)
  return y, np.array(all_experts), np.array(dropped)
