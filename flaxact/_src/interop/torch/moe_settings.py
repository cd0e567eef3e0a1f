"""Routing settings of imported routed FFNs: config, overrides, defaults.

A routed FFN's state dict shows its sizes, but not how it routes: how many
experts a token goes to, whether the chosen weights are renormalised, the
scaling and grouping of DeepSeek-V3, GPT-OSS's clamp. :func:`resolve_settings`
reads each of these, in this order, from

1. a keyword override named as the ``MoE`` argument (``experts_per_token=``,
   ``normalize_weights=``, ``routed_scaling_factor=``, ``num_groups=``,
   ``groups_per_token=``, ``activation=``);
2. ``config=``: a ``transformers`` config object (attributes are read) or a
   mapping with its field names (``num_experts_per_tok``, ``norm_topk_prob``,
   ``routed_scaling_factor``, ``n_group``, ``topk_group``, ``hidden_act``,
   ``swiglu_alpha``, ``swiglu_limit``); a field set to ``None`` counts as
   absent, and fields a layout does not use are ignored;
3. the value every published checkpoint of the layout uses (below);

and raises ``ValueError`` naming the config field where none of them gives
one. ``experts_per_token`` has no published default (Qwen1.5-MoE routes to 4
experts, Qwen2-57B-A14B to 8): it is always needed.

Published values (the config fields in parentheses):

- ``qwen2_moe``, ``olmoe``: ``normalize_weights=False`` (``norm_topk_prob``);
- ``qwen3_moe``: ``normalize_weights=True`` (``norm_topk_prob``);
- ``deepseek_v3``: ``normalize_weights=True`` (``norm_topk_prob``),
  ``routed_scaling_factor=2.5``, ``num_groups=8`` (``n_group``),
  ``groups_per_token=4`` (``topk_group``), as DeepSeek-V3/R1 (256 experts);
- ``gpt_oss``: ``alpha=1.702``, ``limit=7.0`` of its clamped product
  (``swiglu_alpha``, ``swiglu_limit``);
- all but ``gpt_oss``: ``activation='silu'`` (``hidden_act``).

Mixtral and GPT-OSS always renormalise (their modules have no
``norm_topk_prob``); GPT-OSS's activation is its clamped product, so its
``hidden_act`` is ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from flaxact._src.activations.registry import get_activation
from flaxact._src.moe import routers

REQUIRED = object()  # marks a setting without a published default

# The MoE arguments an override may set.
OVERRIDES = (
  'activation',
  'experts_per_token',
  'groups_per_token',
  'normalize_weights',
  'num_groups',
  'routed_scaling_factor',
)

# Config fields that may hold the number of routed experts, and the model
# width, checked against the state dict when the config has them.
EXPERT_COUNT_FIELDS = ('num_local_experts', 'num_experts', 'n_routed_experts')


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting: the config field it is read from and its default."""

  field: str
  default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """What a layout reads from a config, and what its module fixes.

  Attributes:
    read: MoE argument (or ``'alpha'``/``'limit'`` of GPT-OSS's product) to
      the config field it is read from and its published default.
    fixed: MoE arguments the module itself fixes (no config field).
    hidden_field: the config field of the expert hidden size.
  """

  read: Mapping[str, Setting]
  fixed: Mapping[str, Any]
  hidden_field: str


_K = Setting('num_experts_per_tok')
_ACT = Setting('hidden_act', 'silu')
_UNGROUPED = dict(
  routed_scaling_factor=1.0, num_groups=None, groups_per_token=None
)


def _softmax(hidden_field: str, published_norm: bool | None) -> RoutingSpec:
  """A softmax-router layout; ``published_norm=None``: always renormalises."""
  read = dict(experts_per_token=_K, activation=_ACT)
  fixed: dict[str, Any] = dict(_UNGROUPED)
  if published_norm is None:
    fixed['normalize_weights'] = True
  else:
    read['normalize_weights'] = Setting('norm_topk_prob', published_norm)
  return RoutingSpec(read, fixed, hidden_field)


SPECS: Mapping[str, RoutingSpec] = {
  'mixtral': _softmax('intermediate_size', None),
  'qwen2_moe': _softmax('moe_intermediate_size', False),
  'qwen3_moe': _softmax('moe_intermediate_size', True),
  'olmoe': _softmax('intermediate_size', False),
  'deepseek_v3': RoutingSpec(
    read=dict(
      experts_per_token=_K,
      activation=_ACT,
      normalize_weights=Setting('norm_topk_prob', True),
      routed_scaling_factor=Setting('routed_scaling_factor', 2.5),
      num_groups=Setting('n_group', 8),
      groups_per_token=Setting('topk_group', 4),
    ),
    fixed={},
    hidden_field='moe_intermediate_size',
  ),
  'gpt_oss': RoutingSpec(
    read=dict(
      experts_per_token=_K,
      alpha=Setting('swiglu_alpha', 1.702),
      limit=Setting('swiglu_limit', 7.0),
    ),
    fixed=dict(_UNGROUPED, normalize_weights=True),
    hidden_field='intermediate_size',
  ),
}


def config_value(config: Any, field: str) -> Any:
  """``config.field`` or ``config[field]``; ``None`` where it is absent."""
  if config is None:
    return None
  if isinstance(config, Mapping):
    return config.get(field)
  return getattr(config, field, None)


def check_config(config: Any) -> None:
  """Raises ``TypeError`` unless ``config`` is ``None``, a mapping or object.

  A string or number is a mistake (e.g. a path); configs are objects with
  attributes (``transformers.PretrainedConfig``) or mappings.
  """
  if isinstance(config, (str, bytes, int, float)):
    raise TypeError(
      'config must be a transformers config object or a mapping of its'
      f' fields (e.g. config.to_dict()); got {type(config).__name__}'
      f' {config!r}.'
    )


def check_overrides(layout: str, overrides: Mapping[str, Any]) -> None:
  """Raises for an override name that is not a settable MoE argument."""
  for name in overrides:
    if name not in OVERRIDES:
      close = difflib.get_close_matches(name, OVERRIDES, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise TypeError(
        f'unknown routing override {name!r}.{hint} The settings a state dict'
        f' does not show are {", ".join(OVERRIDES)}.'
      )
  if layout == 'gpt_oss' and 'activation' in overrides:
    raise ValueError(
      "layout 'gpt_oss' computes its experts with GPT-OSS's clamped product"
      ' (config fields swiglu_alpha, swiglu_limit); activation= does not'
      ' apply to it.'
    )


def _resolve_one(layout: str, name: str, setting: Setting, config: Any):
  value = config_value(config, setting.field)
  if value is not None:
    return value
  if setting.default is REQUIRED:
    raise ValueError(
      f'layout {layout!r} needs {name}, which a state dict does not show:'
      f' pass config= with the field {setting.field!r} (config.{setting.field}'
      f' of the transformers config) or {name}=.'
    )
  return setting.default


def resolve_settings(
  layout: str, config: Any, overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, float] | None]:
  """The routing settings of ``layout``; see the module docstring.

  Args:
    layout: a normalised layout name, a key of :data:`SPECS`.
    config: ``None``, a config object or a mapping of config fields.
    overrides: MoE arguments given by the caller, which win.

  Returns:
    ``(settings, glu)``: ``settings`` maps ``experts_per_token``,
    ``normalize_weights``, ``routed_scaling_factor``, ``num_groups``,
    ``groups_per_token`` and (except GPT-OSS) ``activation`` to values;
    ``glu`` is ``{'alpha', 'limit'}`` of GPT-OSS's product, else ``None``.

  Raises:
    ValueError: for a needed setting that nothing gives, naming its config
      field, or an unknown activation name.
    TypeError: for a config that is neither an object nor a mapping, or an
      override name that is not a settable MoE argument.
  """
  check_config(config)
  check_overrides(layout, overrides)
  spec = SPECS[layout]
  settings: dict[str, Any] = dict(spec.fixed)
  for name, setting in spec.read.items():
    if name not in overrides:
      settings[name] = _resolve_one(layout, name, setting, config)
  settings.update(overrides)
  glu = None
  if layout == 'gpt_oss':
    glu = {
      'alpha': float(settings.pop('alpha')),
      'limit': float(settings.pop('limit')),
    }
  else:
    get_activation(settings['activation'])  # an unknown name raises here
  return settings, glu


def check_against_state_dict(
  layout: str,
  settings: Mapping[str, Any],
  config: Any,
  sizes: Mapping[str, int],
) -> None:
  """Checks the settings and config against the state dict's sizes.

  Args:
    layout: a normalised layout name.
    settings: the resolved settings.
    config: the config given, or ``None``.
    sizes: ``num_experts``, ``in_features`` and ``hidden_features`` read from
      the state dict.

  Raises:
    ValueError: if the config's expert count, width or expert hidden size
      differs from the state dict's, or ``experts_per_token`` or the groups
      do not fit the number of experts; the message names the config field.
  """
  num_experts = sizes['num_experts']
  expected: dict[str, tuple[str, Any]] = {
    f: ('num_experts', num_experts) for f in EXPERT_COUNT_FIELDS
  }
  expected['hidden_size'] = ('in_features', sizes['in_features'])
  hidden = sizes['hidden_features']
  expected[SPECS[layout].hidden_field] = ('hidden_features', hidden)
  shared = sizes.get('shared_hidden_features')
  if layout == 'qwen2_moe':
    expected['shared_expert_intermediate_size'] = (
      'shared_hidden_features',
      shared,
    )
  if layout == 'deepseek_v3' and shared is not None:
    # DeepseekV3MoE's shared experts are one MLP of n_shared_experts * h units.
    expected['n_shared_experts'] = (
      'shared_hidden_features / hidden_features',
      shared / hidden,
    )
  for field, (what, size) in expected.items():
    value = config_value(config, field)
    if value is not None and value != size:
      raise ValueError(
        f'config field {field!r} is {value!r}, but the state dict has'
        f' {what} = {size}: the config belongs to another model.'
      )
  try:
    k = routers.check_k(
      settings['experts_per_token'],
      num_experts,
      where='from_torch',
      name='experts_per_token (config field num_experts_per_tok)',
    )
    routers.check_groups(
      settings['num_groups'],
      settings['groups_per_token'],
      num_experts,
      k,
      where='from_torch: group-limited routing',
      names=('n_group', 'topk_group'),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(
      f'{e} The state dict has {num_experts} experts. Pass config= with'
      ' num_experts_per_tok, n_group and topk_group, or experts_per_token=,'
      ' num_groups= and groups_per_token=.'
    ) from e
