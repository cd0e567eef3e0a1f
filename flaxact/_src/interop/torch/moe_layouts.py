"""Reading a routed FFN's (mixture of experts) PyTorch ``state_dict``.

:func:`parse_moe_state_dict` turns the state dict of a ``transformers``
sparse-MoE block into a :class:`TorchMoE`: the weights in flaxact's orientation
and the ``MoE`` constructor's settings. It is framework-neutral; the Linen and
NNX ``from_torch`` build the layers from it. **torch is never imported.** Each
layout accepts both key formats (see
:mod:`flaxact._src.interop.torch.moe_arrays`): the per-expert keys of the
published checkpoints and the stacked tensors of ``transformers`` 5 modules.
Keys are relative to the block (``prefix=`` selects it from a whole model's).
The layouts, their ``transformers`` modules and keys are tabled once, in
:mod:`flaxact._src.interop.torch.layouts`.

Routing settings come from ``config=``, keyword overrides and published
defaults: see :mod:`flaxact._src.interop.torch.moe_settings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxact._src.common.checks import normalise_choice
from flaxact._src.interop.torch import moe_arrays as arrays_lib
from flaxact._src.interop.torch import moe_settings as settings_lib
from flaxact._src.interop.torch.tensors import describe_keys

_PROJ = ('gate_proj', 'up_proj', 'down_proj')


@dataclasses.dataclass(frozen=True)
class MoELayout:
  """The keys and fixed structure of one routed-FFN layout."""

  router: str = 'softmax'
  router_key: str = 'gate'
  expert_names: tuple[str, str, str] = _PROJ
  gpt_oss: bool = False  # interleaved (E, in, 2h), biases, router bias
  shared: str | None = None
  shared_gate: bool = False
  correction_bias: bool = False


MOE_LAYOUTS: Mapping[str, MoELayout] = {
  'mixtral': MoELayout(expert_names=('w1', 'w3', 'w2')),
  'qwen2_moe': MoELayout(shared='shared_expert', shared_gate=True),
  'qwen3_moe': MoELayout(),
  'deepseek_v3': MoELayout(
    router='sigmoid', shared='shared_experts', correction_bias=True
  ),
  'gpt_oss': MoELayout(router_key='router', gpt_oss=True),
  'olmoe': MoELayout(),
}


@dataclasses.dataclass(frozen=True)
class TorchMoE:
  """A routed FFN's weights and settings, independent of framework.

  Attributes:
    layout: the layout name the state dict was read with.
    key_format: ``'per_expert'`` or ``'stacked'``, the format found.
    in_features: the input size ``d``.
    hidden_features: each expert's hidden size ``h``.
    out_features: the output size.
    num_experts: the number of routed experts ``E``.
    settings: the ``MoE`` keyword arguments: ``experts_per_token``,
      ``router``, ``normalize_weights``, ``routed_scaling_factor``,
      ``num_groups``, ``groups_per_token``, ``router_use_bias``,
      ``shared_hidden_features``, ``shared_expert_gate``, ``use_bias`` and,
      except for GPT-OSS, ``activation``.
    gpt_oss_glu: for GPT-OSS, ``{'alpha': ..., 'limit': ...}``, the keyword
      arguments of ``gpt_oss_glu`` to pass as ``gated_product``; else
      ``None``.
    params: a Flax-style tree of numpy arrays of :attr:`param_dtype`:
      ``router`` ``{'kernel': (d, E)}`` (and ``'bias'`` ``(E,)``),
      ``gate_proj``/``up_proj`` ``{'kernel': (E, d, h)}``, ``down_proj``
      ``{'kernel': (E, h, out)}`` (biases ``(E, h)``, ``(E, out)`` with
      ``use_bias``), ``shared_expert`` a ``GatedFFN`` tree (``gate_proj``,
      ``up_proj`` ``(d, h_s)``, ``down_proj`` ``(h_s, out)``) and
      ``shared_expert_gate`` ``{'kernel': (d, 1)}`` where present.
    score_correction_bias: DeepSeek-V3's ``e_score_correction_bias``
      ``(E,)`` as float32 (a non-trainable variable), else ``None``.
    param_dtype: the dtype of every array in :attr:`params`.
  """

  layout: str
  key_format: str
  in_features: int
  hidden_features: int
  out_features: int
  num_experts: int
  settings: Mapping[str, Any]
  gpt_oss_glu: Mapping[str, float] | None
  params: Mapping[str, Any]
  score_correction_bias: np.ndarray | None
  param_dtype: np.dtype


def _experts(reader: arrays_lib.Reader, spec: MoELayout):
  """Reads the router and experts; returns ``(format, router, experts)``."""
  stacked = reader.has('experts.gate_up_proj') or reader.has(
    'experts.down_proj'
  )
  indices = arrays_lib.expert_indices(reader)
  router_key = f'{spec.router_key}.weight'
  if not reader.has(router_key) or not (stacked or indices):
    want, alternative = [router_key], ''
    if not (stacked or indices):
      want += ['experts.gate_up_proj', 'experts.down_proj']
      first = f'experts.0.{spec.expert_names[0]}.weight'
      alternative = f' (or per-expert keys {reader.shown(first)!r}, ...)'
    missing = [reader.shown(k) for k in want if not reader.has(k)]
    raise ValueError(
      f'state dict for layout {reader.layout!r} is missing key(s)'
      f' {describe_keys(missing)}{alternative}.'
      f'{arrays_lib.missing_hint(reader, spec.router_key)} It has keys'
      f' {describe_keys([str(k) for k in reader.state_dict])}.'
    )
  if stacked and indices:
    raise ValueError(
      f'state dict for layout {reader.layout!r} mixes stacked expert keys'
      f" ('experts.gate_up_proj') with per-expert keys ('experts.{indices[0]}"
      ".*'); pass one format."
    )
  if stacked:
    num_experts = reader.get('experts.gate_up_proj', 3).shape[0]
  else:
    num_experts = indices[-1] + 1
  router = reader.get(router_key, 2)
  if not stacked and router.shape[0] > num_experts != router.shape[1]:
    # The router has a row per expert: experts past the last key found are
    # missing (read_per_expert names their keys), not extra router rows.
    num_experts = router.shape[0]
  if router.shape[0] != num_experts:
    transposed = router.shape[1] == num_experts
    raise ValueError(
      f'state_dict[{reader.shown(router_key)!r}] has shape {router.shape};'
      f' expected ({num_experts}, in) as torch.nn.Linear, one row per expert'
      f' of the {num_experts} experts.'
      + (' It looks transposed.' if transposed else '')
    )
  in_features = router.shape[1]
  if not stacked:
    found = arrays_lib.read_per_expert(
      reader, spec.expert_names, num_experts, in_features, spec.gpt_oss
    )
  elif spec.gpt_oss:
    found = arrays_lib.read_stacked_interleaved(
      reader, num_experts, in_features
    )
  else:
    found = arrays_lib.read_stacked(reader, num_experts, in_features)
  return ('stacked' if stacked else 'per_expert'), router.T, found


def _tree(reader, spec: MoELayout, router_kernel, found) -> dict[str, Any]:
  """The params tree (see :attr:`TorchMoE.params`), unconverted."""
  in_features, out = router_kernel.shape[0], found['down'].shape[-1]
  tree: dict[str, Any] = {'router': {'kernel': router_kernel}}
  if spec.gpt_oss:
    key = f'{spec.router_key}.bias'
    bias = reader.get(key, 1)
    e = router_kernel.shape[1]
    arrays_lib.check_shape(
      reader, key, bias.shape, (e,), '(E,), one per expert'
    )
    tree['router']['bias'] = bias
  for part, proj in zip(('gate', 'up', 'down'), _PROJ, strict=True):
    tree[proj] = {'kernel': found[part]}
    if part + '_bias' in found:
      tree[proj]['bias'] = found[part + '_bias']
  if spec.shared is not None:
    s = spec.shared + '.'
    gate = arrays_lib.linear(reader, s + 'gate_proj.weight', None, in_features)
    hidden = gate.shape[1]
    tree['shared_expert'] = {
      'gate_proj': {'kernel': gate},
      'up_proj': {
        'kernel': arrays_lib.linear(
          reader, s + 'up_proj.weight', hidden, in_features
        )
      },
      'down_proj': {
        'kernel': arrays_lib.linear(reader, s + 'down_proj.weight', out, hidden)
      },
    }
  if spec.shared_gate:
    kernel = arrays_lib.linear(
      reader, 'shared_expert_gate.weight', 1, in_features
    )
    tree['shared_expert_gate'] = {'kernel': kernel}
  return tree


def _correction_bias(reader, spec: MoELayout, num_experts: int):
  if not spec.correction_bias:
    return None
  key = 'gate.e_score_correction_bias'
  bias = reader.get(key, 1)
  arrays_lib.check_shape(
    reader, key, bias.shape, (num_experts,), '(E,), one per expert'
  )
  return np.asarray(bias, np.float32)


def _check_unused(reader: arrays_lib.Reader, spec: MoELayout) -> None:
  unused = reader.unused()
  if not unused:
    return
  hint = (
    arrays_lib.missing_hint(reader, spec.router_key)
    if arrays_lib.guess_layout(unused)
    else ''
  )
  raise ValueError(
    f'unexpected key(s) {describe_keys(unused)} for layout'
    f" {reader.layout!r}.{hint} Pass only the MoE block's state dict,"
    ' select it with prefix=, or pass strict=False to ignore other keys.'
  )


def parse_moe_state_dict(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  config: Any = None,
  prefix: str = '',
  strict: bool = True,
  param_dtype: Any = None,
  overrides: Mapping[str, Any] | None = None,
) -> TorchMoE:
  """Reads and checks a routed FFN's PyTorch state dict.

  Args:
    state_dict: the MoE block's ``state_dict()`` (or a larger one with
      ``prefix``); values torch tensors or arrays.
    layout: one of :data:`MOE_LAYOUTS`' names.
    config: a ``transformers`` config object or a mapping of its fields, for
      the settings a state dict does not show.
    prefix: only keys starting with ``prefix`` are read, with it removed; a
      missing trailing ``'.'`` is added.
    strict: if true, keys under ``prefix`` that the layout does not read
      raise ``ValueError``; if false they are ignored.
    param_dtype: the dtype of the returned weights; ``None`` keeps the state
      dict's (promoted if its tensors differ).
    overrides: ``MoE`` arguments that win over ``config`` and the published
      defaults: ``experts_per_token``, ``normalize_weights``,
      ``routed_scaling_factor``, ``num_groups``, ``groups_per_token``,
      ``activation``.

  Returns:
    A :class:`TorchMoE`.

  Raises:
    ValueError: for an unknown layout (naming the closest), a missing or
      unexpected key, a shape that does not fit (flagging weights that look
      transposed), expert counts that disagree, or a needed setting that
      neither ``config``, ``overrides`` nor a published default gives
      (naming the config field).
    TypeError: if ``state_dict`` is not a mapping, ``config`` is neither an
      object nor a mapping, or an override is not a settable argument.

  Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> state_dict = {  # a Qwen3MoeSparseMoeBlock: 4 experts, d=8, h=3
    ...   'gate.weight': rng.normal(size=(4, 8)),
    ...   'experts.gate_up_proj': rng.normal(size=(4, 6, 8)),
    ...   'experts.down_proj': rng.normal(size=(4, 8, 3)),
    ... }
    >>> moe = parse_moe_state_dict(
    ...   state_dict, layout='qwen3_moe', config={'num_experts_per_tok': 2}
    ... )
    >>> moe.params['gate_proj']['kernel'].shape
    (4, 8, 3)
    >>> moe.settings['normalize_weights']  # Qwen3-MoE's published value
    True
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      'state_dict must be a mapping from keys to tensors, such as'
      f' module.state_dict(); got {type(state_dict).__name__}.'
    )
  if not isinstance(layout, str):
    raise ValueError(f'layout must be a string; got {layout!r}.')
  name = normalise_choice(layout, MOE_LAYOUTS, 'MoE layout', 'MoE layouts')
  spec = MOE_LAYOUTS[name]
  if prefix and not prefix.endswith('.'):
    prefix += '.'
  reader = arrays_lib.Reader(state_dict, prefix, name)
  key_format, router_kernel, found = _experts(reader, spec)
  tree = _tree(reader, spec, router_kernel, found)
  num_experts, in_features, hidden = found['gate'].shape
  correction = _correction_bias(reader, spec, num_experts)
  if strict:
    _check_unused(reader, spec)

  settings, glu = settings_lib.resolve_settings(name, config, overrides or {})
  shared = tree.get('shared_expert')
  sizes = dict(
    num_experts=num_experts,
    in_features=in_features,
    hidden_features=hidden,
    shared_hidden_features=None
    if shared is None
    else shared['gate_proj']['kernel'].shape[1],
  )
  settings_lib.check_against_state_dict(name, settings, config, sizes)
  settings.update(
    router=spec.router,
    router_use_bias=spec.gpt_oss,
    use_bias=spec.gpt_oss,
    shared_hidden_features=sizes['shared_hidden_features'],
    shared_expert_gate=spec.shared_gate,
  )

  leaves = _leaves(tree)
  dtype = np.dtype(
    jnp.result_type(*leaves) if param_dtype is None else param_dtype
  )
  return TorchMoE(
    layout=name,
    key_format=key_format,
    in_features=int(in_features),
    hidden_features=int(hidden),
    out_features=int(found['down'].shape[-1]),
    num_experts=int(num_experts),
    settings=settings,
    gpt_oss_glu=glu,
    params=_convert(tree, dtype),
    score_correction_bias=correction,
    param_dtype=dtype,
  )


def _leaves(tree: Mapping[str, Any]) -> list[np.ndarray]:
  out: list[np.ndarray] = []
  for value in tree.values():
    out += _leaves(value) if isinstance(value, Mapping) else [value]
  return out


def _convert(tree: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
  return {
    k: _convert(v, dtype)
    if isinstance(v, Mapping)
    else np.ascontiguousarray(v, dtype=dtype)
    for k, v in tree.items()
  }
