"""Reading a PyTorch FFN's ``state_dict``: layouts, checks and conversion.

This module is framework-neutral: it turns a PyTorch state dict into a
:class:`TorchFFN`, a plain description of the layer (gated or not, its
activation, its sizes, and its kernels in Flax's ``(in_features,
out_features)`` orientation). The Linen and NNX builders
(:mod:`flaxact._src.linen_torch`, :mod:`flaxact._src.nnx_torch`) turn that
into layers. **torch is never imported**: tensors are recognised by duck
typing (``.detach().cpu().numpy()``), and dtypes numpy cannot hold
(``bfloat16``, ``float8_*``) are converted through ``.float()`` and cast back
to the matching ``ml_dtypes`` type, so a bfloat16 checkpoint stays bfloat16.

The layouts, with the PyTorch modules they come from (``Linear`` stores its
weight ``(out, in)``; Hugging Face's GPT-2 ``Conv1D`` stores ``(in, out)``):

============  ==========================================  ===============
layout        keys                                        activation
============  ==========================================  ===============
``llama``     ``gate_proj.weight``, ``up_proj.weight``,   ``silu``
              ``down_proj.weight`` (``.bias`` on all
              three or none: ``LlamaConfig.mlp_bias``)
``t5``        ``wi.weight``, ``wo.weight``                ``relu``
``t5_gated``  ``wi_0.weight`` (gate), ``wi_1.weight``     ``gelu_tanh``
              (up), ``wo.weight``
``gpt2``      ``c_fc.weight``, ``c_fc.bias``,             ``gelu_tanh``
              ``c_proj.weight``, ``c_proj.bias``
``bert``      ``intermediate.dense.weight``/``bias``,     ``gelu`` (exact)
              ``output.dense.weight``/``bias``
``phi3``      ``gate_up_proj.weight`` (gate rows first,   ``silu``
              then up), ``down_proj.weight``
============  ==========================================  ===============
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxact._src.checks import normalise_choice
from flaxact._src.registry import get_activation

_GATE, _UP, _DOWN = 'gate_proj', 'up_proj', 'down_proj'


@dataclasses.dataclass(frozen=True)
class _Proj:
  """Where one projection of a layout lives in the state dict."""

  weight: str
  bias: str | None = None
  # Linear stores (out, in) and is transposed; Conv1D stores (in, out).
  transposed: bool = True


@dataclasses.dataclass(frozen=True)
class _Layout:
  """A state-dict layout: its projections, bias rule and activation."""

  activation: str
  projs: Mapping[str, _Proj]
  # 'required': every bias key must be there; 'optional': all or none;
  # 'none': the layout has no biases (a bias key is unexpected).
  bias: str = 'none'
  # The key of a fused (gate rows, then up rows) weight, if any.
  fused_gate_up: str | None = None
  # Keys that belong next to the FFN in the source model but are not part of
  # it; they are accepted and not loaded.
  ignored: tuple[str, ...] = ()

  @property
  def gated(self) -> bool:
    return self.fused_gate_up is not None or _GATE in self.projs


LAYOUTS: Mapping[str, _Layout] = {
  'llama': _Layout(
    activation='silu',
    projs={
      _GATE: _Proj('gate_proj.weight', 'gate_proj.bias'),
      _UP: _Proj('up_proj.weight', 'up_proj.bias'),
      _DOWN: _Proj('down_proj.weight', 'down_proj.bias'),
    },
    bias='optional',
  ),
  't5': _Layout(
    activation='relu',
    projs={_UP: _Proj('wi.weight'), _DOWN: _Proj('wo.weight')},
  ),
  't5_gated': _Layout(
    activation='gelu_tanh',
    projs={
      _GATE: _Proj('wi_0.weight'),
      _UP: _Proj('wi_1.weight'),
      _DOWN: _Proj('wo.weight'),
    },
  ),
  'gpt2': _Layout(
    activation='gelu_tanh',
    projs={
      _UP: _Proj('c_fc.weight', 'c_fc.bias', transposed=False),
      _DOWN: _Proj('c_proj.weight', 'c_proj.bias', transposed=False),
    },
    bias='required',
  ),
  'bert': _Layout(
    activation='gelu',
    projs={
      _UP: _Proj('intermediate.dense.weight', 'intermediate.dense.bias'),
      _DOWN: _Proj('output.dense.weight', 'output.dense.bias'),
    },
    bias='required',
    # BertOutput applies LayerNorm(dropout(dense(h)) + residual) after the
    # FFN; that LayerNorm is not part of the FFN and is not loaded.
    ignored=('output.LayerNorm.weight', 'output.LayerNorm.bias'),
  ),
  'phi3': _Layout(
    activation='silu',
    projs={_DOWN: _Proj('down_proj.weight')},
    fused_gate_up='gate_up_proj.weight',
  ),
}


@dataclasses.dataclass(frozen=True)
class TorchFFN:
  """A PyTorch FFN's weights in Flax orientation, independent of framework.

  Attributes:
    layout: the layout name the weights were read with.
    gated: whether the FFN has a gate projection (``GatedFFN``) or not
      (``FFN``).
    activation: the activation name or callable to build the layer with.
    in_features: the input size ``d``.
    hidden_features: the hidden size ``h``.
    out_features: the output size.
    kernels: ``'gate_proj'`` (gated only), ``'up_proj'``: ``(d, h)``;
      ``'down_proj'``: ``(h, out_features)``; numpy arrays of
      :attr:`param_dtype`.
    biases: the same names mapped to ``(h,)`` and ``(out_features,)`` arrays,
      or empty when the FFN has no biases.
    param_dtype: the dtype of every array in :attr:`kernels` and
      :attr:`biases`.
  """

  layout: str
  gated: bool
  activation: str | Callable[..., Any]
  in_features: int
  hidden_features: int
  out_features: int
  kernels: Mapping[str, np.ndarray]
  biases: Mapping[str, np.ndarray]
  param_dtype: np.dtype

  @property
  def use_bias(self) -> bool:
    """Whether the FFN has biases."""
    return bool(self.biases)

  def params(
    self, fused_gate_up: bool = False
  ) -> dict[str, dict[str, np.ndarray]]:
    """The weights as a Flax params tree ``{proj: {'kernel', 'bias'}}``.

    Args:
      fused_gate_up: for a gated FFN, stack the gate and up kernels into one
        ``gate_up_proj`` kernel of shape ``(d, 2, h)`` (``[:, 0]`` the gate,
        ``[:, 1]`` up) and their biases into ``(2, h)``, the layout of the
        layers' ``fused_gate_up=True``.

    Returns:
      A nested dict of numpy arrays; no ``'bias'`` entries without biases.

    Raises:
      ValueError: if ``fused_gate_up`` is true for an FFN without a gate.
    """
    if fused_gate_up and not self.gated:
      raise ValueError(
        f'fused_gate_up=True needs a gated layout; {self.layout!r} has no'
        ' gate projection.'
      )
    tree: dict[str, dict[str, np.ndarray]] = {}
    for name, kernel in self.kernels.items():
      tree[name] = {'kernel': kernel}
      if name in self.biases:
        tree[name]['bias'] = self.biases[name]
    if fused_gate_up:
      gate, up = tree.pop(_GATE), tree.pop(_UP)
      tree['gate_up_proj'] = {
        k: np.stack([gate[k], up[k]], axis=-2) for k in gate
      }
    return tree


def _normalise_layout(layout: Any) -> str:
  if not isinstance(layout, str):
    raise ValueError(
      f'layout must be one of {", ".join(map(repr, LAYOUTS))}; got {layout!r}.'
    )
  key = normalise_choice(layout, LAYOUTS, 'layout', 'layouts')
  return key


def _jax_dtype_named(name: str) -> np.dtype | None:
  candidate = getattr(jnp, name, None)
  if candidate is None:
    return None
  try:
    return np.dtype(candidate)
  except TypeError:
    return None


def to_numpy(value: Any, key: str = 'value') -> np.ndarray:
  """Converts a torch tensor, JAX array or array-like to a numpy array.

  torch is not imported. A torch tensor is recognised by its ``detach``
  method and read as ``value.detach().cpu().numpy()``; a dtype numpy cannot
  represent (``torch.bfloat16``, ``torch.float8_e4m3fn``, ...) is read through
  ``.float()`` and cast back to the ``ml_dtypes`` type of the same name, which
  is exact because float32 holds every value of those dtypes.

  Args:
    value: a ``torch.Tensor``, ``numpy.ndarray``, ``jax.Array`` or anything
      ``numpy.asarray`` accepts.
    key: the state-dict key, used in error messages.

  Returns:
    A numpy array with the value's dtype.

  Raises:
    ValueError: if a tensor's dtype has no numpy or ``ml_dtypes`` equivalent.
  """
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, 'detach') and hasattr(value, 'numpy'):
    tensor = value.detach()
    if hasattr(tensor, 'cpu'):
      tensor = tensor.cpu()
    dtype_name = str(getattr(tensor, 'dtype', '')).removeprefix('torch.')
    try:
      return np.asarray(tensor.numpy())
    except TypeError:  # numpy cannot hold this dtype (e.g. bfloat16)
      target = _jax_dtype_named(dtype_name)
      if target is None or not hasattr(tensor, 'float'):
        raise ValueError(
          f'state_dict[{key!r}] has dtype {dtype_name!r}, which has no numpy'
          ' equivalent; convert it first, e.g. tensor.float().'
        ) from None
      return np.asarray(tensor.float().numpy()).astype(target)
  return np.asarray(value)


def _describe_keys(keys: list[str], limit: int = 12) -> str:
  shown = ', '.join(map(repr, keys[:limit]))
  more = f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''
  return f'[{shown}{more}]'


def _expected_keys(spec: _Layout, with_bias: bool) -> list[str]:
  keys = [spec.fused_gate_up] if spec.fused_gate_up else []
  for proj in spec.projs.values():
    keys.append(proj.weight)
    if with_bias and proj.bias is not None:
      keys.append(proj.bias)
  return keys


def _missing_hint(layout: str, keys: list[str]) -> str:
  """Suggests a prefix or another layout for a state dict that lacks keys."""
  present = set(keys)
  for name, spec in LAYOUTS.items():
    required = _expected_keys(spec, spec.bias == 'required')
    if name == layout:
      # The keys may sit under a prefix, as in a whole model's state dict.
      for key in keys:
        if key.endswith('.' + required[0]):
          prefix = key[: -len(required[0])]
          return f" The keys look prefixed: pass prefix='{prefix}'."
    elif present.issuperset(required):
      return f' The keys match layout {name!r}.'
  return ''


def _matrix(arrays: Mapping[str, np.ndarray], key: str, shown: str):
  w = arrays[key]
  if w.ndim != 2:
    raise ValueError(
      f'state_dict[{shown!r}] must be a 2-D weight matrix; got shape {w.shape}.'
    )
  return w


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], why):
  if got != want:
    raise ValueError(
      f'state_dict[{key!r}] has shape {got}; expected {want} {why}.'
    )


def check_layer_kwargs(
  layer_kwargs: Mapping[str, Any], fixed: tuple[str, ...]
) -> None:
  """Raises ``TypeError`` for layer options that the state dict determines."""
  clash = sorted(set(layer_kwargs) & set(fixed))
  if clash:
    raise TypeError(
      f'from_torch sets {", ".join(clash)} from the state dict; do not pass'
      ' them.'
    )


def check_activation(activation: Any, module_type: type) -> None:
  """Rejects learnable activation modules, whose weights torch lacks."""
  if isinstance(activation, module_type):
    raise TypeError(
      'from_torch: activation must be a registry name or a function; a'
      f' {type(activation).__name__} module has parameters of its own that'
      ' the state dict does not hold.'
    )


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
    layout: one of :data:`LAYOUTS`' names.
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
      that do not fit together; the message names the key, and the expected
      and actual shapes.
    TypeError: if ``state_dict`` is not a mapping.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      'state_dict must be a mapping from keys to tensors, such as'
      f' module.state_dict(); got {type(state_dict).__name__}.'
    )
  name = _normalise_layout(layout)
  spec = LAYOUTS[name]
  if activation is None:
    activation = spec.activation
  else:
    get_activation(activation)  # an unknown name raises ValueError here

  if prefix and not prefix.endswith('.'):
    prefix += '.'
  all_keys = [str(k) for k in state_dict]
  local = {k[len(prefix) :]: k for k in all_keys if k.startswith(prefix)}

  bias_keys = [p.bias for p in spec.projs.values() if p.bias is not None]
  if spec.bias == 'required':
    with_bias = True
  elif spec.bias == 'optional':
    with_bias = any(k in local for k in bias_keys)
  else:
    with_bias = False
  expected = _expected_keys(spec, with_bias)

  missing = [prefix + k for k in expected if k not in local]
  if missing:
    why = ''
    if spec.bias == 'optional' and with_bias:
      found = [prefix + k for k in bias_keys if k in local]
      why = (
        f' Layout {name!r} takes a bias on every projection or on none;'
        f' found {_describe_keys(found)}.'
      )
    raise ValueError(
      f'state dict for layout {name!r} is missing key(s)'
      f' {_describe_keys(missing)}.{why}{_missing_hint(name, all_keys)} It'
      f' has keys {_describe_keys(all_keys)}.'
    )
  unexpected = [
    local[k] for k in local if k not in expected and k not in spec.ignored
  ]
  if unexpected and strict:
    raise ValueError(
      f'unexpected key(s) {_describe_keys(unexpected)} for layout {name!r},'
      f' which reads {_describe_keys([prefix + k for k in expected])}. Pass'
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
    arrays[key] = arr
  if param_dtype is None:
    param_dtype = jnp.result_type(*arrays.values())
  param_dtype = np.dtype(param_dtype)

  def shown(key: str) -> str:
    return prefix + key

  def read(proj: _Proj) -> np.ndarray:
    w = _matrix(arrays, proj.weight, shown(proj.weight))
    return w.T if proj.transposed else w  # Flax (in, out)

  kernels: dict[str, np.ndarray] = {}
  down = spec.projs[_DOWN]
  if spec.fused_gate_up is not None:
    key = spec.fused_gate_up
    fused = _matrix(arrays, key, shown(key))
    if fused.shape[0] % 2:
      raise ValueError(
        f'state_dict[{shown(key)!r}] has shape {fused.shape}; its first'
        ' axis stacks the gate rows, then the up rows, so it must be even.'
      )
    hidden = fused.shape[0] // 2
    kernels[_GATE] = fused[:hidden].T
    kernels[_UP] = fused[hidden:].T
    first = key
  else:
    first_proj = spec.projs[_GATE] if spec.gated else spec.projs[_UP]
    first = first_proj.weight
    kernels[_UP] = read(spec.projs[_UP])
    if spec.gated:
      kernels[_GATE] = read(first_proj)
      up_key = spec.projs[_UP].weight
      _check_shape(
        shown(up_key),
        arrays[up_key].shape,
        arrays[first].shape,
        f'(the shape of {shown(first)!r})',
      )
  in_features, hidden = kernels[_UP].shape

  down_raw = _matrix(arrays, down.weight, shown(down.weight))
  down_in_axis = 1 if down.transposed else 0
  if down_raw.shape[down_in_axis] != hidden:
    if down.transposed:
      want, stored = f'(out_features, {hidden})', '(out, in) as torch.nn.Linear'
    else:
      want, stored = f'({hidden}, out_features)', '(in, out) as Conv1D'
    hint = ''
    if down_raw.shape[1 - down_in_axis] == hidden:
      hint = f' It looks transposed: layout {name!r} stores it {stored}.'
    raise ValueError(
      f'state_dict[{shown(down.weight)!r}] has shape {down_raw.shape};'
      f' expected {want}: its input size must equal the hidden size'
      f' {hidden} of {shown(first)!r}.{hint}'
    )
  kernels[_DOWN] = read(down)
  out_features = kernels[_DOWN].shape[1]

  biases: dict[str, np.ndarray] = {}
  if with_bias:
    sizes = {_GATE: hidden, _UP: hidden, _DOWN: out_features}
    for proj_name, proj in spec.projs.items():
      if proj.bias is None:
        continue
      _check_shape(
        shown(proj.bias),
        arrays[proj.bias].shape,
        (sizes[proj_name],),
        f'(the output size of {shown(proj.weight)!r})',
      )
      biases[proj_name] = arrays[proj.bias]

  order = (_GATE, _UP, _DOWN)
  return TorchFFN(
    layout=name,
    gated=spec.gated,
    activation=activation,
    in_features=int(in_features),
    hidden_features=int(hidden),
    out_features=int(out_features),
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
