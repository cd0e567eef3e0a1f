"""Loading a PyTorch FFN's weights into a Flax Linen layer: ``from_torch``.

The state dict is read and checked by :mod:`flaxact._src.interop.torch.build`
and, for routed FFNs, :mod:`flaxact._src.interop.torch.moe_build`
(framework-neutral, no torch import); this module builds the Linen layer and its
variables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from typing_extensions import Unpack

from flaxact._src.interop.torch import moe_build
from flaxact._src.interop.torch.build import prepare
from flaxact._src.interop.torch.layouts import LayoutName
from flaxact._src.interop.torch.moe_build import NOT_GIVEN, NotGiven
from flaxact._src.layers.import_options import LayerOptions
from flaxact._src.linen.ffn import FFN
from flaxact._src.linen.gated import GatedFFN
from flaxact._src.linen.moe import STATS, MoE

# Set by from_torch from the state dict; passing them is an error.
_FIXED = ('hidden_features', 'out_features', 'use_bias', 'kernel_init',
          'bias_init')  # fmt: skip


def _flatten(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  """``(path, array)`` for every array of a nested mapping."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, (*path, key))
    else:
      yield (*path, key), value


def _fill(abstract: Any, collections: Mapping[str, Any]) -> Any:
  """``abstract`` (from ``eval_shape(layer.init)``) with real values.

  ``collections`` holds the values in the same nesting (``{'params': ...}``
  and, for a sigmoid-routed ``MoE``, ``{'batch_stats': ...}``).
  """

  def is_leaf(x):
    return isinstance(x, nn.meta.AxisMetadata)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    abstract, is_leaf=is_leaf
  )
  flat = dict(_flatten(collections))
  filled = []
  for path, leaf in leaves:
    key = tuple(getattr(k, 'key', k) for k in path)
    spec = leaf.unbox() if is_leaf(leaf) else leaf
    value = flat.pop(key, None)
    if value is None or value.shape != spec.shape:
      got = None if value is None else value.shape
      raise RuntimeError(  # a flaxact bug, not a problem of the user's
        f'from_torch: the layer expects {key} of shape {spec.shape}; the'
        f' converted weights give {got}.'
      )
    value = jnp.asarray(value, spec.dtype)
    filled.append(leaf.replace_boxed(value) if is_leaf(leaf) else value)
  if flat:
    raise RuntimeError(
      f'from_torch: the layer has no parameters {sorted(flat)}.'
    )
  return jax.tree_util.tree_unflatten(treedef, filled)


def _variables(layer: nn.Module, in_features: int, values: Any) -> Any:
  """The layer's variables, structured as ``layer.init``'s, with values."""
  x = jax.ShapeDtypeStruct((1, in_features), jnp.float32)
  kwargs: dict[str, Any] = (
    {} if isinstance(layer, MoE) else {'deterministic': True}
  )
  abstract = jax.eval_shape(
    lambda x: layer.init(jax.random.key(0), x, **kwargs), x
  )
  return _fill(abstract, values)


def from_torch(
  state_dict: Mapping[str, Any],
  *,
  layout: LayoutName | str,
  activation: str | Callable[..., Any] | None = None,
  prefix: str = '',
  strict: bool = True,
  param_dtype: Any = None,
  fused_gate_up: bool = False,
  config: Any = None,
  experts_per_token: int | NotGiven = NOT_GIVEN,
  normalize_weights: bool | NotGiven = NOT_GIVEN,
  routed_scaling_factor: float | NotGiven = NOT_GIVEN,
  num_groups: int | NotGiven | None = NOT_GIVEN,
  groups_per_token: int | NotGiven | None = NOT_GIVEN,
  **layer_kwargs: Unpack[LayerOptions],
) -> tuple[FFN | GatedFFN | MoE, dict[str, Any]]:
  """Builds a Linen FFN or MoE layer and its variables from a state dict.

  A dense gated layout gives a :class:`GatedFFN`, the other dense layouts an
  :class:`FFN`, a routed-FFN layout a :class:`MoE`. Weights are read in the
  layout's orientation (``torch.nn.Linear`` ``(out, in)`` is transposed to
  Flax's ``(in, out)``; GPT-2's ``Conv1D`` is already ``(in, out)``) and
  checked against each other: a mismatch that the opposite orientation would
  fit says the weights look transposed. torch is never imported: values may
  be torch tensors (read with ``.detach().cpu().numpy()``; bfloat16 and
  float8 are kept), numpy or JAX arrays.

  A routed FFN's state dict shows its sizes but not how it routes: those
  settings come from the keyword overrides below, else from ``config``,
  else from the layout's published checkpoints (Qwen3-MoE and DeepSeek-V3
  renormalise the chosen weights, Qwen2-MoE and OLMoE do not; DeepSeek-V3
  scales by 2.5 with 8 groups, 4 per token). ``experts_per_token`` has no
  default: without it or ``config.num_experts_per_tok`` loading fails,
  never silently.

  Args:
    state_dict: the PyTorch FFN (or MoE block) module's ``state_dict()``,
      or a larger one (a whole model's) together with ``prefix``.
    layout: the source architecture. Dense FFNs: ``'llama'``
      (``'mistral'``, ``'qwen2'``, ``'qwen3'`` and ``'gemma'`` read the same
      keys with their own default activation), ``'t5'``, ``'t5_gated'``,
      ``'gpt2'``, ``'starcoder2'``, ``'bert'``, ``'phi3'``. Routed FFNs:
      ``'mixtral'``, ``'qwen2_moe'``, ``'qwen3_moe'``, ``'deepseek_v3'``,
      ``'gpt_oss'``, ``'olmoe'``, each in both key formats (the published
      checkpoints' per-expert keys and the stacked ``experts.gate_up_proj``
      of ``transformers`` 5 modules). The keys, orientation and default
      activation of each are tabled in the documentation (page "Porting
      from PyTorch and Hugging Face", section "Layouts").
    activation: a registry name (Hugging Face ``config.hidden_act`` names
      keep their meaning) or an element-wise JAX function; ``None`` uses the
      layout's (for a routed FFN, ``config.hidden_act``, else ``'silu'``;
      ``'gpt_oss'`` takes none: its experts use :func:`flaxact.gpt_oss_glu`
      with ``config.swiglu_alpha``/``swiglu_limit``). A torch module or
      function is rejected with the name to pass instead.
    prefix: read only the keys under this prefix, e.g.
      ``'model.layers.0.mlp.'`` in a whole model's state dict; keys outside
      it are ignored. A missing trailing ``'.'`` is added.
    strict: if true (default), a key under ``prefix`` that the layout does
      not read raises ``ValueError``; if false it is ignored.
    param_dtype: the parameter dtype; ``None`` (default) keeps the state
      dict's (a bfloat16 checkpoint gives bfloat16 parameters).
    fused_gate_up: for a dense gated layout, store the gate and up kernels
      as one fused ``gate_up_proj`` of shape ``(in, 2, hidden)``
      (``GatedFFN(fused_gate_up=True)``). The default keeps ``gate_proj`` and
      ``up_proj``, for ``'phi3'`` too (its fused weight is split).
    config: routed FFNs only: a ``transformers`` config object or a mapping
      with its field names (``num_experts_per_tok``, ``norm_topk_prob``,
      ``routed_scaling_factor``, ``n_group``, ``topk_group``, ``hidden_act``,
      ``swiglu_alpha``, ``swiglu_limit``); sizes it states
      (``num_local_experts``, ``hidden_size``, ...) must match the state
      dict's. Fields a layout does not use are ignored.
    experts_per_token: routed FFNs: ``k`` (``num_experts_per_tok``).
    normalize_weights: routed FFNs: renormalise the chosen weights
      (``norm_topk_prob``).
    routed_scaling_factor: routed FFNs (DeepSeek-V3): weight scale.
    num_groups: DeepSeek-V3: expert groups (``n_group``); ``None`` routes
      ungrouped.
    groups_per_token: DeepSeek-V3: groups kept per token (``topk_group``).
    **layer_kwargs: other options of the layer, e.g. ``dtype``,
      ``precision``, ``dropout_rate``, ``remat``; for a :class:`MoE`
      ``capacity_factor``, ``impl``, ``tile_size``.

  Returns:
    ``(layer, variables)``: ``variables`` has the structure of
    ``layer.init``'s, its parameters boxed with their logical axis names
    (``nn.unbox`` gives plain arrays); DeepSeek-V3's
    ``e_score_correction_bias`` is the non-trainable
    ``variables['batch_stats']['score_correction_bias']``. Call
    ``layer.apply(variables, x)``.

  Raises:
    ValueError: for an unknown layout (naming the closest, dense or MoE) or
      activation name, a missing key, an unexpected key (with ``strict``), a
      weight that is not a floating-point matrix, shapes that do not fit
      together (the message names the key and the expected and actual
      shapes), a routing setting that is needed and given by nothing (the
      message names the config field), or a config whose sizes differ from
      the state dict's.
    TypeError: for a state dict that is not a mapping, a learnable activation
      module, an activation that does not run on JAX arrays (a torch
      module), a layer option the state dict determines (such as
      ``hidden_features``, ``use_bias`` or ``num_experts``), or ``config``
      or a routing keyword with a dense layout.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import flax.linen as nn
    >>> from flaxact import linen as fl
    >>> rng = np.random.default_rng(0)
    >>> state_dict = {  # torch.nn.Linear weights are (out, in)
    ...     'gate_proj.weight': rng.normal(size=(64, 16)).astype(np.float32),
    ...     'up_proj.weight': rng.normal(size=(64, 16)).astype(np.float32),
    ...     'down_proj.weight': rng.normal(size=(16, 64)).astype(np.float32),
    ... }
    >>> layer, variables = fl.from_torch(state_dict, layout='llama')
    >>> type(layer).__name__, layer.activation
    ('GatedFFN', 'silu')
    >>> jax.tree.map(jnp.shape, nn.unbox(variables))
    ... # doctest: +NORMALIZE_WHITESPACE
    {'params': {'down_proj': {'kernel': (64, 16)},
                'gate_proj': {'kernel': (16, 64)},
                'up_proj': {'kernel': (16, 64)}}}
    >>> layer.apply(variables, jnp.ones((2, 16))).shape
    (2, 16)

    A Qwen3-MoE block of 4 experts (``transformers`` 5 stacked keys):

    >>> moe_state_dict = {
    ...     'gate.weight': rng.normal(size=(4, 16)).astype(np.float32),
    ...     'experts.gate_up_proj': rng.normal(size=(4, 64, 16)),
    ...     'experts.down_proj': rng.normal(size=(4, 16, 32)),
    ... }
    >>> moe, variables = fl.from_torch(
    ...     moe_state_dict, layout='qwen3_moe',
    ...     config={'num_experts_per_tok': 2, 'norm_topk_prob': True})
    >>> moe.num_experts, moe.experts_per_token, moe.hidden_features
    (4, 2, 32)
    >>> nn.unbox(variables)['params']['gate_proj']['kernel'].shape
    (4, 16, 32)
    >>> moe.apply(variables, jnp.ones((2, 16))).shape
    (2, 16)

  See also:
    :func:`flaxact.nnx.from_torch`, :class:`GatedFFN`, :class:`FFN`,
    :class:`MoE`.
  """
  name, is_moe = moe_build.resolve_any_layout(layout)
  routing = dict(
    experts_per_token=experts_per_token,
    normalize_weights=normalize_weights,
    routed_scaling_factor=routed_scaling_factor,
    num_groups=num_groups,
    groups_per_token=groups_per_token,
  )
  overrides = moe_build.routing_overrides(name, is_moe, config, routing)
  if is_moe:
    moe, options = moe_build.prepare_moe(
      state_dict,
      layout=name,
      config=config,
      overrides=overrides,
      activation=activation,
      prefix=prefix,
      strict=strict,
      param_dtype=param_dtype,
      fused_gate_up=fused_gate_up,
      layer_kwargs=layer_kwargs,
      fixed=moe_build.MOE_FIXED,
      module_type=nn.Module,
    )
    layer = MoE(**options)
    values: dict[str, Any] = {'params': moe.params}
    if moe.score_correction_bias is not None:
      values[STATS] = {'score_correction_bias': moe.score_correction_bias}
    return layer, _variables(layer, moe.in_features, values)
  ffn, params, options = prepare(
    state_dict,
    layout=name,
    activation=activation,
    prefix=prefix,
    strict=strict,
    param_dtype=param_dtype,
    fused_gate_up=fused_gate_up,
    layer_kwargs=layer_kwargs,
    fixed=_FIXED,
    module_type=nn.Module,
  )
  cls = GatedFFN if ffn.gated else FFN
  layer = cls(ffn.hidden_features, ffn.out_features, **options)
  return layer, _variables(layer, ffn.in_features, {'params': params})
