"""Loading a PyTorch FFN's weights into a Flax NNX layer: ``from_torch``.

The state dict is read and checked by :mod:`flaxact._src.interop.torch.build`
and, for routed FFNs, :mod:`flaxact._src.interop.torch.moe_build`
(framework-neutral, no torch import); this module builds the NNX layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from typing_extensions import Unpack

from flaxact._src.interop.torch import moe_build
from flaxact._src.interop.torch.build import prepare
from flaxact._src.interop.torch.layouts import LayoutName
from flaxact._src.interop.torch.moe_build import NOT_GIVEN, NotGiven
from flaxact._src.layers.import_options import LayerOptions
from flaxact._src.nnx.ffn import FFN
from flaxact._src.nnx.gated import GatedFFN
from flaxact._src.nnx.moe import MoE

# Set by from_torch from the state dict; passing them is an error.
_FIXED = ('in_features', 'hidden_features', 'out_features', 'use_bias',
          'kernel_init', 'bias_init')  # fmt: skip


def _zeros(key: Any, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
  del key  # placeholders, overwritten with the state dict's weights
  return jnp.zeros(shape, dtype)


def _load(module: Any, values: Mapping[str, Any], path: str = '') -> None:
  """Sets the variables of ``module`` named by a nested mapping of arrays.

  Each value keeps the variable's dtype and sharding (a layer built under a
  mesh stays sharded).
  """
  for name, value in values.items():
    if isinstance(value, Mapping):
      _load(getattr(module, name), value, f'{path}{name}.')
      continue
    variable = getattr(module, name)
    old = variable[...]
    if old.shape != value.shape:
      raise RuntimeError(  # a flaxact bug, not a problem of the user's
        f'from_torch: the layer expects {path}{name} of shape {old.shape};'
        f' the converted weights give {value.shape}.'
      )
    variable.set_value(
      jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
    )


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
  rngs: nnx.Rngs | None = None,
  **layer_kwargs: Unpack[LayerOptions],
) -> FFN | GatedFFN | MoE:
  """Builds an NNX FFN or MoE layer with the weights of a state dict.

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
    rngs: passed to the layer, which keeps its ``dropout`` stream when
      ``dropout_rate > 0``; the weights come from the state dict. Default
      ``nnx.Rngs(params=0)`` (no dropout stream: pass ``rngs`` here or to
      the call for dropout in training mode).
    **layer_kwargs: other options of the layer, e.g. ``dtype``,
      ``precision``, ``dropout_rate``, ``remat``; for a :class:`MoE`
      ``capacity_factor``, ``impl``, ``tile_size``.

  Returns:
    The layer, with ``kernel`` and ``bias`` parameters from the state dict
    (sharded like a freshly built layer's when built under a mesh);
    DeepSeek-V3's ``e_score_correction_bias`` is the layer's non-trainable
    ``score_correction_bias`` (an ``nnx.BatchStat``).

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
    >>> import jax.numpy as jnp, numpy as np
    >>> from flaxact import nnx as fx
    >>> rng = np.random.default_rng(0)
    >>> state_dict = {  # GPT-2's Conv1D weights are (in, out)
    ...     'c_fc.weight': rng.normal(size=(16, 64)).astype(np.float32),
    ...     'c_fc.bias': np.zeros(64, np.float32),
    ...     'c_proj.weight': rng.normal(size=(64, 16)).astype(np.float32),
    ...     'c_proj.bias': np.zeros(16, np.float32),
    ... }
    >>> layer = fx.from_torch(state_dict, layout='gpt2')
    >>> type(layer).__name__, layer.up_proj.kernel.shape
    ('FFN', (16, 64))
    >>> layer(jnp.ones((2, 16))).shape
    (2, 16)

    A DeepSeek-V3 block of 8 experts in 4 groups (per-expert keys, as in
    the published checkpoints), its settings from a config mapping and one
    override:

    >>> moe_state_dict = {
    ...     'gate.weight': rng.normal(size=(8, 16)),
    ...     'gate.e_score_correction_bias': np.zeros(8),
    ... }
    >>> for p in [f'experts.{i}.' for i in range(8)] + ['shared_experts.']:
    ...   moe_state_dict[p + 'gate_proj.weight'] = np.ones((32, 16))
    ...   moe_state_dict[p + 'up_proj.weight'] = np.ones((32, 16))
    ...   moe_state_dict[p + 'down_proj.weight'] = np.ones((16, 32))
    >>> config = {'num_experts_per_tok': 2, 'n_group': 4, 'topk_group': 2}
    >>> moe = fx.from_torch(moe_state_dict, layout='deepseek_v3',
    ...                     config=config, routed_scaling_factor=1.0)
    >>> moe.routing.router, moe.num_groups, moe.routed_scaling_factor
    ('sigmoid', 4, 1.0)
    >>> moe.score_correction_bias.shape
    (8,)
    >>> moe(jnp.ones((2, 16))).shape
    (2, 16)

  See also:
    :func:`flaxact.linen.from_torch`, :class:`GatedFFN`, :class:`FFN`,
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
  rngs = nnx.Rngs(params=0) if rngs is None else rngs
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
      fixed=('in_features', *moe_build.MOE_FIXED),
      module_type=nnx.Module,
    )
    layer = MoE(
      moe.in_features, **options, kernel_init=_zeros, bias_init=_zeros,
      rngs=rngs,
    )  # fmt: skip
    _load(layer, moe.params)
    if moe.score_correction_bias is not None:
      _load(layer, {'score_correction_bias': moe.score_correction_bias})
    return layer
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
    module_type=nnx.Module,
  )
  cls = GatedFFN if ffn.gated else FFN
  layer = cls(
    ffn.in_features,
    ffn.hidden_features,
    ffn.out_features,
    kernel_init=_zeros,
    bias_init=_zeros,
    rngs=rngs,
    **options,
  )
  _load(layer, params)
  return layer
