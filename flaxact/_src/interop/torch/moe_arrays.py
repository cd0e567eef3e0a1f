"""Reading expert weights from a routed FFN's PyTorch state dict.

Two key formats hold the same weights. The per-expert keys of the published
checkpoints store one ``torch.nn.Linear`` weight ``(out, in)`` per expert and
projection (``experts.{i}.gate_proj.weight``, or Mixtral's ``w1`` (gate),
``w3`` (up), ``w2`` (down)). ``transformers`` 5 modules stack them:
``experts.gate_up_proj`` ``(E, 2 * hidden, in)`` (each expert's gate rows,
then its up rows) and ``experts.down_proj`` ``(E, out, hidden)``; GPT-OSS
stores ``(E, in, 2 * hidden)`` with gate and up in alternate columns (gate
first), ``(E, hidden, out)``, and the biases ``experts.gate_up_proj_bias``
``(E, 2 * hidden)`` (interleaved the same way) and ``experts.down_proj_bias``.

Every reader returns kernels in flaxact's orientation: gate and up
``(E, in, hidden)``, down ``(E, hidden, out)``. torch is never imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxact._src.interop.torch.tensors import describe_keys, to_numpy

EXPERT_KEY = re.compile(r'experts\.(\d+)\.(.+)')


class Reader:
  """Reads checked floating-point arrays from the keys under a prefix."""

  def __init__(self, state_dict: Mapping[str, Any], prefix: str, layout: str):
    self.state_dict = state_dict
    self.prefix = prefix
    self.layout = layout
    keys = [str(k) for k in state_dict]
    self.local = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    self.used: set[str] = set()
    self._arrays: dict[str, np.ndarray] = {}

  def shown(self, key: str) -> str:
    return self.prefix + key

  def has(self, key: str) -> bool:
    return key in self.local

  def get(self, key: str, ndim: int) -> np.ndarray:
    """The array at ``prefix + key`` with ``ndim`` axes, marked as used."""
    if key not in self.local:
      raise ValueError(
        f'state dict for layout {self.layout!r} is missing key'
        f' {self.shown(key)!r}.'
      )
    self.used.add(key)
    if key not in self._arrays:
      value = self.state_dict[self.local[key]]
      self._arrays[key] = to_numpy(value, self.shown(key))
    arr = self._arrays[key]
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(
        f'state_dict[{self.shown(key)!r}] must be floating point; got dtype'
        f' {arr.dtype.name}.'
      )
    if arr.ndim != ndim:
      raise ValueError(
        f'state_dict[{self.shown(key)!r}] must have {ndim} axes; got shape'
        f' {arr.shape}.'
      )
    return arr

  def unused(self) -> list[str]:
    return [self.local[k] for k in self.local if k not in self.used]


def guess_layout(keys: list[str]) -> str | None:
  """The layout whose distinctive keys the state dict has, if any."""
  marks = (
    ('gpt_oss', ('router.weight', 'experts.gate_up_proj_bias')),
    ('deepseek_v3', ('e_score_correction_bias', 'shared_experts.')),
    ('qwen2_moe', ('shared_expert_gate.weight',)),
    ('mixtral', ('.w1.weight',)),
  )
  for name, parts in marks:
    if any(part in key for key in keys for part in parts):
      return name
  return None


def missing_hint(reader: Reader, router_key: str) -> str:
  """Why the expected keys are not there: prefix, other layout, MXFP4."""
  keys = [str(k) for k in reader.state_dict]
  if any(k.endswith(('_blocks', '_scales')) for k in keys):
    return (
      ' The keys hold a quantized (MXFP4 *_blocks/*_scales) checkpoint:'
      ' dequantize it first (transformers: Mxfp4Config(dequantize=True)).'
    )
  router = f'{router_key}.weight'
  for key in keys:
    if key.endswith('.' + router) and key != reader.prefix + router:
      return f" The keys look prefixed: pass prefix='{key[: -len(router)]}'."
  guess = guess_layout(list(reader.local))
  if guess is not None and guess != reader.layout:
    return f' The keys match layout {guess!r}.'
  return ''


def check_shape(
  reader: Reader, key: str, got: tuple, want: tuple, stored: str
) -> None:
  """Raises unless ``got`` fits ``want``; flags reversed last two axes.

  Args:
    reader: the reader, for the key's full name and the layout.
    key: the key, without prefix.
    got: the array's shape.
    want: the expected shape; ``None`` entries match any size.
    stored: how the layout stores it, e.g. ``'(out, in) as
      torch.nn.Linear'``.
  """

  def fits(shape: tuple) -> bool:
    return len(shape) == len(want) and all(
      w is None or w == g for g, w in zip(shape, want, strict=True)
    )

  if fits(tuple(got)):
    return
  hint = ''
  if len(got) >= 2 and fits((*got[:-2], got[-1], got[-2])):
    hint = ' It looks transposed.'
  sizes = ['_' if w is None else str(w) for w in want]
  shown = f'({sizes[0]},)' if len(sizes) == 1 else f'({", ".join(sizes)})'
  raise ValueError(
    f'state_dict[{reader.shown(key)!r}] has shape {tuple(got)}; expected'
    f' {shown}: layout {reader.layout!r} stores it {stored}.{hint}'
  )


def linear(reader: Reader, key: str, out: int | None, in_: int) -> np.ndarray:
  """A ``torch.nn.Linear`` weight ``(out, in)`` as a kernel ``(in, out)``."""
  w = reader.get(key, 2)
  check_shape(reader, key, w.shape, (out, in_), '(out, in) as torch.nn.Linear')
  return w.T


def expert_indices(reader: Reader) -> list[int]:
  """The sorted expert indices ``i`` of keys ``experts.{i}.*``."""
  found = {int(m.group(1)) for k in reader.local if (m := EXPERT_KEY.match(k))}
  return sorted(found)


def read_per_expert(
  reader: Reader,
  names: tuple[str, str, str],
  num_experts: int,
  in_features: int,
  with_bias: bool,
) -> dict[str, np.ndarray]:
  """Stacks the per-expert ``Linear`` weights ``experts.{i}.NAME.weight``.

  Args:
    reader: the state-dict reader.
    names: the gate, up and down projections' names.
    num_experts: the number of experts ``E`` (every ``i < E`` must be there).
    in_features: the input size (from the router).
    with_bias: whether each projection has a ``.bias`` too (GPT-OSS).

  Returns:
    ``gate``, ``up``: ``(E, in, hidden)``; ``down``: ``(E, hidden, out)``;
    with biases also ``gate_bias``, ``up_bias`` ``(E, hidden)`` and
    ``down_bias`` ``(E, out)``.
  """
  suffixes = ('weight', 'bias') if with_bias else ('weight',)
  missing = [
    reader.shown(f'experts.{i}.{name}.{s}')
    for i in range(num_experts)
    for name in names
    for s in suffixes
    if not reader.has(f'experts.{i}.{name}.{s}')
  ]
  if missing:
    raise ValueError(
      f'state dict for layout {reader.layout!r} ({num_experts} experts,'
      f' per-expert keys) is missing key(s) {describe_keys(missing)}.'
    )
  gate_name, up_name, down_name = names
  hidden = out = None
  parts: dict[str, list[np.ndarray]] = {}
  for i in range(num_experts):
    e = f'experts.{i}.'
    gate = linear(reader, e + gate_name + '.weight', hidden, in_features)
    hidden = gate.shape[1]
    up = linear(reader, e + up_name + '.weight', hidden, in_features)
    down = linear(reader, e + down_name + '.weight', out, hidden)
    out = down.shape[1]
    entries = dict(gate=gate, up=up, down=down)
    if with_bias:
      for part, name, size in (
        ('gate', gate_name, hidden),
        ('up', up_name, hidden),
        ('down', down_name, out),
      ):
        bias = reader.get(e + name + '.bias', 1)
        check_shape(reader, e + name + '.bias', bias.shape, (size,), '(out,)')
        entries[part + '_bias'] = bias
    for part, arr in entries.items():
      parts.setdefault(part, []).append(arr)
  return {part: np.stack(arrs) for part, arrs in parts.items()}


def read_stacked(
  reader: Reader, num_experts: int, in_features: int
) -> dict[str, np.ndarray]:
  """Splits ``experts.gate_up_proj`` ``(E, 2h, in)``, ``experts.down_proj``.

  Returns:
    ``gate``, ``up``: ``(E, in, hidden)``; ``down``: ``(E, hidden, out)``.
  """
  key = 'experts.gate_up_proj'
  gate_up = reader.get(key, 3)
  e, two_h = gate_up.shape[:2]
  hint = ''
  if gate_up.shape[1] == in_features and gate_up.shape[2] % 2 == 0:
    hint = (
      " It looks like GPT-OSS's (E, in, 2 * hidden): use layout='gpt_oss'"
      ' or transpose the last two axes.'
    )
  if e != num_experts or two_h % 2 or gate_up.shape[2] != in_features:
    raise ValueError(
      f'state_dict[{reader.shown(key)!r}] has shape {gate_up.shape};'
      f' expected ({num_experts}, 2 * hidden, {in_features}): layout'
      f" {reader.layout!r} stacks each expert's gate rows, then its up rows,"
      f' as torch.nn.Linear (out, in).{hint}'
    )
  hidden = two_h // 2
  down = reader.get('experts.down_proj', 3)
  check_shape(
    reader,
    'experts.down_proj',
    down.shape,
    (num_experts, None, hidden),
    '(E, out, hidden) as torch.nn.Linear',
  )
  kernels = np.swapaxes(gate_up, 1, 2)  # (E, in, 2h)
  return dict(
    gate=kernels[..., :hidden],
    up=kernels[..., hidden:],
    down=np.swapaxes(down, 1, 2),
  )


def read_stacked_interleaved(
  reader: Reader, num_experts: int, in_features: int
) -> dict[str, np.ndarray]:
  """GPT-OSS's ``(E, in, 2h)`` interleaved ``gate_up_proj``, its biases.

  Returns:
    The arrays of :func:`read_per_expert` with biases.
  """
  key = 'experts.gate_up_proj'
  gate_up = reader.get(key, 3)
  e, in_, two_h = gate_up.shape
  if e != num_experts or in_ != in_features or two_h % 2:
    hint = ''
    if gate_up.shape[1] % 2 == 0 and gate_up.shape[2] == in_features:
      hint = (
        ' It looks like (E, 2 * hidden, in), the orientation of the other'
        ' layouts: transpose the last two axes.'
      )
    raise ValueError(
      f'state_dict[{reader.shown(key)!r}] has shape {gate_up.shape};'
      f' expected ({num_experts}, {in_features}, 2 * hidden): layout'
      " 'gpt_oss' stores (E, in, 2 * hidden), gate and up in alternate"
      f' columns.{hint}'
    )
  hidden = two_h // 2
  bias_key, down_key = 'experts.gate_up_proj_bias', 'experts.down_proj'
  bias = reader.get(bias_key, 2)
  check_shape(reader, bias_key, bias.shape, (e, two_h), '(E, 2 * hidden)')
  down = reader.get(down_key, 3)
  check_shape(
    reader, down_key, down.shape, (e, hidden, None), '(E, hidden, out)'
  )
  down_bias_key = 'experts.down_proj_bias'
  down_bias = reader.get(down_bias_key, 2)
  out = down.shape[2]
  check_shape(reader, down_bias_key, down_bias.shape, (e, out), '(E, out)')
  return dict(
    gate=gate_up[..., ::2],
    up=gate_up[..., 1::2],
    down=down,
    gate_bias=bias[..., ::2],
    up_bias=bias[..., 1::2],
    down_bias=down_bias,
  )
