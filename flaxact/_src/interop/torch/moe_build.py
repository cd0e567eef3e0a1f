"""The set-up of ``from_torch`` for routed FFNs (mixture of experts).

The Linen and NNX ``from_torch`` take dense and MoE layouts under one entry
point: :func:`resolve_any_layout` tells them apart (and names the closest layout
of either kind for a typo), :func:`prepare_moe` reads a routed FFN's state dict
(:func:`flaxact._src.interop.torch.moe_layouts.parse_moe_state_dict`) and
returns the ``MoE`` constructor's keyword arguments. Framework-neutral; torch is
never imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from flaxact._src.activations.gpt_oss import gpt_oss_glu
from flaxact._src.common.checks import match_choice
from flaxact._src.interop.torch.build import (
  check_activation,
  check_layer_kwargs,
)
from flaxact._src.interop.torch.layouts import LAYOUTS
from flaxact._src.interop.torch.moe_layouts import (
  MOE_LAYOUTS,
  TorchMoE,
  parse_moe_state_dict,
)


class NotGiven:
  """The type of :data:`NOT_GIVEN`: a routing keyword that was not passed.

  ``None`` cannot mark an absent override: ``num_groups=None`` is a setting
  (ungrouped routing) that wins over ``config.n_group``.
  """

  def __repr__(self) -> str:
    return 'NOT_GIVEN'


#: Default of ``from_torch``'s routing keywords: take the setting from
#: ``config=`` or the layout's published value.
NOT_GIVEN = NotGiven()

#: The ``MoE`` arguments ``from_torch`` takes as routing overrides.
ROUTING = (
  'experts_per_token',
  'normalize_weights',
  'routed_scaling_factor',
  'num_groups',
  'groups_per_token',
)

#: ``MoE`` arguments that a routed FFN's state dict and layout determine.
MOE_FIXED = (
  'hidden_features',
  'num_experts',
  'out_features',
  'router',
  'router_use_bias',
  'use_bias',
  'shared_hidden_features',
  'shared_expert_gate',
  'gated_product',
  'kernel_init',
  'bias_init',
)


def resolve_any_layout(layout: Any) -> tuple[str, bool]:
  """Returns ``(name, is_moe)`` for a dense or routed-FFN layout name.

  Args:
    layout: a layout name; case and ``-`` versus ``_`` are ignored.

  Returns:
    The normalised name and whether it is a routed-FFN (MoE) layout.

  Raises:
    ValueError: for a value that is not a layout name; the message names the
      closest layout of either kind and lists both kinds.
  """
  name, heading = match_choice(
    layout,
    {'Dense FFN layouts': LAYOUTS, 'routed FFN (MoE) layouts': MOE_LAYOUTS},
    'layout',
  )
  return name, heading != 'Dense FFN layouts'


def routing_overrides(
  layout: str, is_moe: bool, config: Any, given: Mapping[str, Any]
) -> dict[str, Any]:
  """The routing keywords passed: ``parse_moe_state_dict``'s ``overrides``.

  Args:
    layout: the normalised layout name.
    is_moe: whether it is a routed-FFN layout.
    config: ``from_torch``'s ``config``.
    given: each name of :data:`ROUTING` mapped to the value passed, or
      :data:`NOT_GIVEN`.

  Returns:
    The items of ``given`` that were passed.

  Raises:
    TypeError: if ``config`` or a routing keyword is passed for a dense
      layout, which has no router.
  """
  overrides = {k: v for k, v in given.items() if v is not NOT_GIVEN}
  if not is_moe and (config is not None or overrides):
    names = (['config'] if config is not None else []) + sorted(overrides)
    raise TypeError(
      f'from_torch: {", ".join(names)} configure a routed FFN (MoE); layout'
      f' {layout!r} is a dense FFN. The MoE layouts are'
      f' {", ".join(map(repr, sorted(MOE_LAYOUTS)))}.'
    )
  return overrides


def prepare_moe(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  config: Any,
  overrides: Mapping[str, Any],
  activation: str | Callable[..., Any] | None,
  prefix: str,
  strict: bool,
  param_dtype: Any,
  fused_gate_up: bool,
  layer_kwargs: Mapping[str, Any],
  fixed: tuple[str, ...],
  module_type: type,
) -> tuple[TorchMoE, dict[str, Any]]:
  """Checks ``from_torch``'s arguments for a routed FFN; reads its weights.

  Args:
    state_dict: as ``from_torch``'s.
    layout: a normalised MoE layout name.
    config: as ``from_torch``'s.
    overrides: the routing keywords passed (see :func:`routing_overrides`).
    activation: as ``from_torch``'s; ``None`` reads ``config.hidden_act``
      (default ``'silu'``).
    prefix: as ``from_torch``'s.
    strict: as ``from_torch``'s.
    param_dtype: as ``from_torch``'s.
    fused_gate_up: must be false: ``MoE`` keeps ``gate_proj`` and
      ``up_proj`` apart.
    layer_kwargs: the other layer options given to ``from_torch``.
    fixed: the layer options the state dict sets (passing one is an error).
    module_type: the framework's module class.

  Returns:
    ``(moe, options)``: the parsed routed FFN and the keyword arguments of
    the ``MoE`` constructor (everything but ``in_features``), with
    ``gated_product`` set to GPT-OSS's clamped product for ``'gpt_oss'``.

  Raises:
    ValueError: see :func:`~flaxact._src.interop.torch.moe_layouts.
      parse_moe_state_dict`; also for ``fused_gate_up=True``.
    TypeError: for a layer option the state dict determines, or an
      activation that is a module or does not run on JAX arrays.
  """
  check_layer_kwargs(layer_kwargs, fixed)
  check_activation(activation, module_type)
  if fused_gate_up:
    raise ValueError(
      f'from_torch: fused_gate_up=True is for dense gated layouts; the MoE'
      f" layer of layout {layout!r} keeps its experts' gate_proj and up_proj"
      ' kernels apart.'
    )
  if activation is not None:
    overrides = {**overrides, 'activation': activation}
  moe = parse_moe_state_dict(
    state_dict,
    layout=layout,
    config=config,
    prefix=prefix,
    strict=strict,
    param_dtype=param_dtype,
    overrides=overrides,
  )
  options = dict(moe.settings)
  options.update(
    hidden_features=moe.hidden_features,
    num_experts=moe.num_experts,
    out_features=moe.out_features,
    param_dtype=moe.param_dtype,
    **layer_kwargs,
  )
  if moe.gpt_oss_glu is not None:
    options['gated_product'] = functools.partial(gpt_oss_glu, **moe.gpt_oss_glu)
  return moe, options
