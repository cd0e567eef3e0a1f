"""Reading a PyTorch FFN's ``state_dict`` into a framework-neutral description.

:func:`parse_state_dict` selects the layout's keys (:func:`select_keys`), reads
the kernels in Flax's ``(in, out)`` orientation (:func:`read_kernels`) and the
biases (:func:`read_biases`), and returns a :class:`TorchFFN`. The layouts are
in :mod:`flaxact._src.interop.torch.layouts`; the Linen and NNX builders turn a
:class:`TorchFFN` into layers. torch is never imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxact._src.activations.registry import get_activation
from flaxact._src.interop.torch.ffn import TorchFFN
from flaxact._src.interop.torch.layouts import (
  DOWN,
  GATE,
  LAYOUTS,
  UP,
  Layout,
  Proj,
  resolve_layout,
  same_keys_other_orientation,
)
from flaxact._src.interop.torch.tensors import describe_keys, to_numpy


def _keys(keys: list[str]) -> str:
  return describe_keys(keys, limit=12)


def _alias(a: Layout, b: Layout) -> bool:
  """Whether two layouts read the same keys the same way."""
  return a.weight_keys() == b.weight_keys() and a.linear == b.linear


def _missing_hint(name: str, keys: list[str]) -> str:
  """Suggests a prefix or another layout for a state dict that lacks keys."""
  present = set(keys)
  for other, spec in LAYOUTS.items():
    required = spec.expected_keys(spec.bias == 'required')
    if other == name:
      # The keys may sit under a prefix, as in a whole model's state dict.
      for key in keys:
        if key.endswith('.' + required[0]):
          prefix = key[: -len(required[0])]
          return f" The keys look prefixed: pass prefix='{prefix}'."
    elif present.issuperset(required) and not _alias(spec, LAYOUTS[name]):
      return f' The keys match layout {other!r}.'
  return ''


def select_keys(
  state_dict: Mapping[str, Any],
  name: str,
  prefix: str,
  strict: bool,
) -> tuple[dict[str, np.ndarray], bool]:
  """Selects and converts the keys layout ``name`` reads.

  Args:
    state_dict: the state dict.
    name: a key of :data:`LAYOUTS`.
    prefix: the keys' prefix, ending in ``'.'`` (or empty).
    strict: raise for keys under ``prefix`` that the layout does not read.

  Returns:
    ``(arrays, with_bias)``: the layout's keys (without ``prefix``) mapped to
    floating-point numpy arrays, and whether the biases are present.

  Raises:
    TypeError: if ``state_dict`` is not a mapping.
    ValueError: for a missing key, an unexpected key (with ``strict``) or a
      value that is not floating point.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      'state_dict must be a mapping from keys to tensors, such as'
      f' module.state_dict(); got {type(state_dict).__name__}.'
    )
  spec = LAYOUTS[name]
  all_keys = [str(k) for k in state_dict]
  local = {k[len(prefix) :]: k for k in all_keys if k.startswith(prefix)}
  if spec.bias == 'optional':
    with_bias = any(k in local for k in spec.bias_keys())
  else:
    with_bias = spec.bias == 'required'
  expected = spec.expected_keys(with_bias)

  missing = [prefix + k for k in expected if k not in local]
  if missing:
    why = ''
    if spec.bias == 'optional' and with_bias:
      found = [prefix + k for k in spec.bias_keys() if k in local]
      why = (
        f' Layout {name!r} takes a bias on every projection or on none;'
        f' found {_keys(found)}.'
      )
    raise ValueError(
      f'state dict for layout {name!r} is missing key(s)'
      f' {_keys(missing)}.{why}{_missing_hint(name, all_keys)} It'
      f' has keys {_keys(all_keys)}.'
    )
  unexpected = [
    local[k] for k in local if k not in expected and k not in spec.ignored
  ]
  if unexpected and strict:
    raise ValueError(
      f'unexpected key(s) {_keys(unexpected)} for layout {name!r},'
      f' which reads {_keys([prefix + k for k in expected])}. Pass'
      " only the FFN's state dict, select it with prefix=, or pass"
      ' strict=False to ignore other keys.'
    )
  arrays: dict[str, np.ndarray] = {}
  for key in expected:
    arr = to_numpy(state_dict[local[key]], prefix + key)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(
        f'state_dict[{prefix + key!r}] must be floating point; got dtype'
        f' {arr.dtype.name}.'
      )
    if key in spec.weight_keys() and arr.ndim != 2:
      raise ValueError(
        f'state_dict[{prefix + key!r}] must be a 2-D weight matrix; got'
        f' shape {arr.shape}.'
      )
    arrays[key] = arr
  return arrays, with_bias


class _ShapeError(ValueError):
  """Shapes that do not fit together (the orientation may be the cause)."""


def _stored(proj: Proj, flip: bool) -> str:
  return Proj(proj.weight, linear=proj.linear != flip).stored_as


def read_kernels(
  spec: Layout, arrays: Mapping[str, np.ndarray], prefix: str, flip: bool
) -> dict[str, np.ndarray]:
  """Reads the kernels in Flax's ``(in, out)`` orientation.

  Args:
    spec: the layout.
    arrays: from :func:`select_keys`.
    prefix: the keys' prefix, for messages.
    flip: read every weight in the opposite orientation to the layout's
      (used to tell whether the weights look transposed).

  Returns:
    ``'gate_proj'`` (gated), ``'up_proj'``: ``(d, h)``; ``'down_proj'``:
    ``(h, out)``.

  Raises:
    ValueError: (a ``_ShapeError``) if the shapes do not chain.
  """

  def kernel(proj: Proj) -> np.ndarray:
    w = arrays[proj.weight]
    return w.T if proj.linear != flip else w

  kernels: dict[str, np.ndarray] = {}
  if spec.fused_gate_up is not None:
    key = prefix + spec.fused_gate_up
    fused = arrays[spec.fused_gate_up]
    fused = fused.T if flip else fused
    if fused.shape[0] % 2:
      raise _ShapeError(
        f'state_dict[{key!r}] has shape {arrays[spec.fused_gate_up].shape};'
        ' its first axis stacks the gate rows, then the up rows, so it must'
        ' be even.'
      )
    hidden = fused.shape[0] // 2
    kernels[GATE], kernels[UP] = fused[:hidden].T, fused[hidden:].T
    first = key
  else:
    kernels[UP] = kernel(spec.projs[UP])
    first = prefix + spec.projs[UP].weight
    if spec.gated:
      gate, up = spec.projs[GATE], spec.projs[UP]
      kernels[GATE] = kernel(gate)
      first = prefix + gate.weight
      got, want = arrays[up.weight].shape, arrays[gate.weight].shape
      if got != want:
        hint = ''
        if got == want[::-1]:
          hint = f' It looks transposed: {_stored(up, flip)}.'
        raise _ShapeError(
          f'state_dict[{prefix + up.weight!r}] has shape {got}; expected'
          f' {want} (the shape of {first!r}).{hint}'
        )
  down = spec.projs[DOWN]
  raw = arrays[down.weight]
  hidden = kernels[UP].shape[1]
  in_axis = 1 if down.linear != flip else 0
  if raw.shape[in_axis] != hidden:
    want = '(out_features, {})' if in_axis else '({}, out_features)'
    hint = ''
    if raw.shape[1 - in_axis] == hidden:
      hint = (
        f' It looks transposed: the layout stores it {_stored(down, flip)}.'
      )
    raise _ShapeError(
      f'state_dict[{prefix + down.weight!r}] has shape {raw.shape}; expected'
      f' {want.format(hidden)}: its input size must equal the hidden size'
      f' {hidden} of {first!r}.{hint}'
    )
  kernels[DOWN] = kernel(down)
  return kernels


def read_biases(
  spec: Layout,
  arrays: Mapping[str, np.ndarray],
  prefix: str,
  kernels: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
  """Reads the biases, each checked against its kernel's output size.

  Args:
    spec: the layout.
    arrays: from :func:`select_keys` (with the biases).
    prefix: the keys' prefix, for messages.
    kernels: from :func:`read_kernels`.

  Returns:
    The projections' names mapped to their biases.

  Raises:
    ValueError: (a ``_ShapeError``) for a bias of the wrong size.
  """
  biases: dict[str, np.ndarray] = {}
  for name, proj in spec.projs.items():
    if proj.bias is None:
      continue
    got, want = arrays[proj.bias].shape, (kernels[name].shape[1],)
    if got != want:
      raise _ShapeError(
        f'state_dict[{prefix + proj.bias!r}] has shape {got}; expected'
        f' {want} (the output size of {prefix + proj.weight!r}).'
      )
    biases[name] = arrays[proj.bias]
  return biases


def _transposed_hint(
  name: str, arrays: Mapping[str, np.ndarray], prefix: str, with_bias: bool
) -> str:
  """Says so when the opposite orientation would fit every shape."""
  spec = LAYOUTS[name]
  try:
    kernels = read_kernels(spec, arrays, prefix, flip=True)
    if with_bias:
      read_biases(spec, arrays, prefix, kernels)
  except _ShapeError:
    return ''
  if kernels[UP].shape[0] != kernels[DOWN].shape[1]:
    return ''  # an FFN's output size is its input size
  stored = 'them (out, in) as torch.nn.Linear'
  if not spec.linear:
    stored = 'them (in, out) as Conv1D'
  hint = f' The weights look transposed: layout {name!r} stores {stored}'
  other = same_keys_other_orientation(name)
  if other is not None:
    return hint + f'; weights stored the other way are layout {other!r}.'
  return hint + '.'


def parse_state_dict(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  activation: str | Callable[..., Any] | None = None,
  prefix: str = '',
  strict: bool = True,
  param_dtype: Any = None,
) -> TorchFFN:
  """Reads and checks a PyTorch FFN state dict; see :class:`TorchFFN`.

  Args:
    state_dict: the FFN's ``state_dict()`` (or a larger one with
      ``prefix``), values torch tensors or arrays.
    layout: a name in :data:`~flaxact._src.interop.torch.layouts.LAYOUTS`.
    activation: overrides the layout's activation (a registry name or a
      callable); ``None`` keeps the layout's.
    prefix: only keys that start with ``prefix`` are read, with it removed.
      A missing trailing ``'.'`` is added.
    strict: if true, keys under ``prefix`` that the layout does not use raise
      ``ValueError``; if false they are ignored.
    param_dtype: the dtype of the returned weights; ``None`` keeps the state
      dict's (the promoted dtype if its tensors differ).

  Returns:
    A :class:`TorchFFN`.

  Raises:
    ValueError: for an unknown layout or activation name, a missing or
      unexpected key, a weight that is not a floating-point matrix, or shapes
      that do not fit together; the message names the key, the expected and
      actual shapes, and whether the weights look transposed.
    TypeError: if ``state_dict`` is not a mapping.

  Examples:
    >>> import numpy as np
    >>> sd = {'wi.weight': np.ones((6, 4)), 'wo.weight': np.ones((4, 6))}
    >>> ffn = parse_state_dict(sd, layout='t5')
    >>> ffn.kernels['up_proj'].shape, ffn.activation
    ((4, 6), 'relu')
  """
  name = resolve_layout(layout)
  spec = LAYOUTS[name]
  if activation is None:
    activation = spec.activation
  else:
    get_activation(activation)  # an unknown name raises ValueError here
  if prefix and not prefix.endswith('.'):
    prefix += '.'
  arrays, with_bias = select_keys(state_dict, name, prefix, strict)
  try:
    kernels = read_kernels(spec, arrays, prefix, flip=False)
    biases = read_biases(spec, arrays, prefix, kernels) if with_bias else {}
  except _ShapeError as err:
    hint = _transposed_hint(name, arrays, prefix, with_bias)
    raise ValueError(f'{err}{hint}') from None
  if param_dtype is None:
    param_dtype = jnp.result_type(*arrays.values())
  param_dtype = np.dtype(param_dtype)
  order = (GATE, UP, DOWN)
  in_features, hidden = kernels[UP].shape
  return TorchFFN(
    layout=name,
    gated=spec.gated,
    activation=activation,
    in_features=int(in_features),
    hidden_features=int(hidden),
    out_features=int(kernels[DOWN].shape[1]),
    kernels={
      k: np.ascontiguousarray(kernels[k], dtype=param_dtype)
      for k in order
      if k in kernels
    },
    biases={
      k: np.asarray(biases[k], dtype=param_dtype) for k in order if k in biases
    },
    param_dtype=param_dtype,
  )
