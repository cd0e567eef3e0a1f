"""Loading a PyTorch FFN's weights into a Flax Linen layer: ``from_torch``.

The state dict is read and checked by :mod:`flaxact._src.torch_build`
(framework-neutral, no torch import); this module builds the Linen layer and
its variables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxact._src.linen_layers import FFN, GatedFFN
from flaxact._src.torch_build import prepare

# Set by from_torch from the state dict; passing them is an error.
_FIXED = ('hidden_features', 'out_features', 'use_bias', 'kernel_init',
          'bias_init')  # fmt: skip


def _fill(abstract: Any, params: Mapping[str, Any]) -> Any:
  """``abstract`` (from ``eval_shape(layer.init)``) with real values."""

  def is_leaf(x):
    return isinstance(x, nn.meta.AxisMetadata)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    abstract, is_leaf=is_leaf
  )
  flat = {
    ('params', proj, name): value
    for proj, arrays in params.items()
    for name, value in arrays.items()
  }
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


def from_torch(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  activation: str | Callable[..., Any] | None = None,
  prefix: str = '',
  strict: bool = True,
  param_dtype: Any = None,
  fused_gate_up: bool = False,
  **layer_kwargs: Any,
) -> tuple[FFN | GatedFFN, dict[str, Any]]:
  """Builds a Linen FFN layer and its variables from a PyTorch state dict.

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
    **layer_kwargs: other options of the layer, e.g. ``dtype``,
      ``precision``, ``dropout_rate``, ``remat``.

  Returns:
    ``(layer, variables)``: ``variables`` has the structure of
    ``layer.init``'s, its parameters boxed with their logical axis names
    (``nn.unbox`` gives plain arrays). Call ``layer.apply(variables, x)``.

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

  See also:
    :func:`flaxact.nnx.from_torch`, :class:`GatedFFN`, :class:`FFN`.
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
    module_type=nn.Module,
  )
  cls = GatedFFN if ffn.gated else FFN
  layer = cls(ffn.hidden_features, ffn.out_features, **options)
  x = jax.ShapeDtypeStruct((1, ffn.in_features), jnp.float32)
  abstract = jax.eval_shape(
    lambda x: layer.init(jax.random.key(0), x, deterministic=True), x
  )
  return layer, _fill(abstract, params)
