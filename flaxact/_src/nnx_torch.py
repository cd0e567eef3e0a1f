"""Loading a PyTorch FFN's weights into a Flax NNX layer: ``from_torch``.

The state dict is read and checked by :mod:`flaxact._src.torch_build`
(framework-neutral, no torch import); this module builds the NNX layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxact._src.nnx_layers import FFN, GatedFFN
from flaxact._src.torch_build import prepare

# Set by from_torch from the state dict; passing them is an error.
_FIXED = ('in_features', 'hidden_features', 'out_features', 'use_bias',
          'kernel_init', 'bias_init')  # fmt: skip


def _zeros(key: Any, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
  del key  # placeholders, overwritten with the state dict's weights
  return jnp.zeros(shape, dtype)


def from_torch(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  activation: str | Callable[..., Any] | None = None,
  prefix: str = '',
  strict: bool = True,
  param_dtype: Any = None,
  fused_gate_up: bool = False,
  rngs: nnx.Rngs | None = None,
  **layer_kwargs: Any,
) -> FFN | GatedFFN:
  """Builds an NNX FFN layer with the weights of a PyTorch state dict.

  A gated layout gives a :class:`GatedFFN`, the others an :class:`FFN`.
  Weights are read in the layout's orientation (``torch.nn.Linear``
  ``(out, in)`` is transposed to Flax's ``(in, out)``; GPT-2's ``Conv1D`` is
  already ``(in, out)``) and checked against each other: a mismatch that the
  opposite orientation would fit says the weights look transposed. torch is
  never imported: values may be torch tensors (read with
  ``.detach().cpu().numpy()``; bfloat16 and float8 are kept), numpy or JAX
  arrays.

  Args:
    state_dict: the PyTorch FFN module's ``state_dict()``, or a larger one
      (a whole model's) together with ``prefix``.
    layout: the source architecture: ``'llama'`` (``'mistral'``,
      ``'qwen2'``, ``'qwen3'`` and ``'gemma'`` read the same keys with their
      own default activation), ``'t5'``, ``'t5_gated'``, ``'gpt2'``,
      ``'starcoder2'``, ``'bert'`` or ``'phi3'``. The keys, orientation and
      default activation of each are tabled in the README (section "Loading
      PyTorch weights") and in :mod:`flaxact._src.torch_layouts`.
    activation: a registry name (Hugging Face ``config.hidden_act`` names
      keep their meaning) or an element-wise JAX function; ``None`` uses the
      layout's. A torch module or function is rejected with the name to
      pass instead.
    prefix: read only the keys under this prefix, e.g.
      ``'model.layers.0.mlp.'`` in a whole model's state dict; keys outside
      it are ignored. A missing trailing ``'.'`` is added.
    strict: if true (default), a key under ``prefix`` that the layout does
      not read raises ``ValueError``; if false it is ignored.
    param_dtype: the parameter dtype; ``None`` (default) keeps the state
      dict's (a bfloat16 checkpoint gives bfloat16 parameters).
    fused_gate_up: for a gated layout, store the gate and up kernels as one
      fused ``gate_up_proj`` of shape ``(in, 2, hidden)``
      (``GatedFFN(fused_gate_up=True)``). The default keeps ``gate_proj`` and
      ``up_proj``, for ``'phi3'`` too (its fused weight is split).
    rngs: passed to the layer, which keeps its ``dropout`` stream when
      ``dropout_rate > 0``; the weights come from the state dict. Default
      ``nnx.Rngs(params=0)`` (no dropout stream: pass ``rngs`` here or to
      the call for dropout in training mode).
    **layer_kwargs: other options of the layer, e.g. ``dtype``,
      ``precision``, ``dropout_rate``, ``remat``.

  Returns:
    The layer, with ``kernel`` and ``bias`` parameters from the state dict
    (sharded like a freshly built layer's when built under a mesh).

  Raises:
    ValueError: for an unknown layout or activation name, a missing key, an
      unexpected key (with ``strict``), a weight that is not a floating-point
      matrix, or shapes that do not fit together; the message names the key
      and the expected and actual shapes.
    TypeError: for a state dict that is not a mapping, a learnable activation
      module, an activation that does not run on JAX arrays (a torch
      module), or a layer option the state dict determines (such as
      ``hidden_features`` or ``use_bias``).

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

  See also:
    :func:`flaxact.linen.from_torch`, :class:`GatedFFN`, :class:`FFN`.
  """
  ffn, params, options = prepare(
    state_dict,
    layout=layout,
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
    rngs=nnx.Rngs(params=0) if rngs is None else rngs,
    **options,
  )
  for proj_name, arrays in params.items():
    proj = getattr(layer, proj_name)
    for name, value in arrays.items():
      param = getattr(proj, name)
      old = param[...]
      if old.shape != value.shape:
        raise RuntimeError(  # a flaxact bug, not a problem of the user's
          f'from_torch: the layer expects {proj_name}.{name} of shape'
          f' {old.shape}; the converted weights give {value.shape}.'
        )
      param.set_value(
        jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
      )
  return layer
