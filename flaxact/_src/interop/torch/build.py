"""The set-up that the Linen and NNX ``from_torch`` builders share.

:func:`prepare` checks the layer options and the activation, reads the state
dict (:func:`flaxact._src.interop.torch.state_dict.parse_state_dict`) and
returns what the builders need: the parsed FFN, its params tree and the layer
options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxact._src.activations.registry import ACTIVATIONS
from flaxact._src.interop.torch.ffn import TorchFFN
from flaxact._src.interop.torch.state_dict import parse_state_dict

# Hugging Face's and PyTorch's activation modules, by class name, and the
# name that gives the same function here.
_TORCH_CLASS_NAMES = {
  'GELUActivation': 'gelu',
  'NewGELUActivation': 'gelu_new',
  'GELUTanh': 'gelu_pytorch_tanh',
  'PytorchGELUTanh': 'gelu_pytorch_tanh',
  'FastGELUActivation': 'gelu_fast',
  'AccurateGELUActivation': 'gelu_accurate',
  'QuickGELUActivation': 'quick_gelu',
  'ClippedGELUActivation': 'gelu_10',
  'SiLUActivation': 'silu',
  'MishActivation': 'mish',
  'LinearActivation': 'linear',
  'LaplaceActivation': 'laplace',
  'ReLUSquaredActivation': 'relu2',
  'SqrtSoftplusActivation': 'sqrtsoftplus',
  'SiLU': 'silu',
  'ReLU': 'relu',
  'ReLU6': 'relu6',
  'Tanh': 'tanh',
  'Sigmoid': 'sigmoid',
  'Mish': 'mish',
  'Hardswish': 'hardswish',
  'Hardsigmoid': 'hardsigmoid',
  'LeakyReLU': 'leaky_relu',
  'Softplus': 'softplus',
}


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


def _name_for(activation: Any) -> str | None:
  """The registry name of a torch activation module or function, if known."""
  cls = type(activation).__name__
  if cls == 'GELU':  # torch.nn.GELU(approximate='none' | 'tanh')
    approximate = getattr(activation, 'approximate', 'none')
    return 'gelu_pytorch_tanh' if approximate == 'tanh' else 'gelu'
  if cls in _TORCH_CLASS_NAMES:
    return _TORCH_CLASS_NAMES[cls]
  name = getattr(activation, '__name__', None)
  return name if name in ACTIVATIONS else None


def check_activation(activation: Any, module_type: type) -> None:
  """Rejects activations that cannot be used with the loaded weights.

  Args:
    activation: ``None``, a registry name or a JAX function.
    module_type: the framework's module class (``nn.Module``,
      ``nnx.Module``): learnable activation modules have parameters the state
      dict does not hold.

  Raises:
    TypeError: for a learnable activation module, or a callable that does not
      run on JAX arrays (a torch module or function, a numpy function); the
      message says which name to pass instead where it can tell.
  """
  if activation is None or isinstance(activation, str):
    return
  if isinstance(activation, module_type):
    raise TypeError(
      'from_torch: activation must be a registry name or a function; a'
      f' {type(activation).__name__} module has parameters of its own that'
      ' the state dict does not hold.'
    )
  try:
    if not callable(activation):
      raise TypeError(f'{type(activation).__name__} is not callable')
    probe = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    out = jax.eval_shape(activation, probe)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != probe.shape:
      raise TypeError(f'it returned {out!r} for a (2, 4) float32 input')
  except Exception as err:
    name = _name_for(activation)
    fix = f'activation={name!r}' if name else 'its registry name'
    raise TypeError(
      'from_torch: activation must be a registry name (the Hugging Face'
      ' config.hidden_act names work) or an element-wise JAX function; got'
      f' {type(activation).__module__}.{type(activation).__name__}, which'
      f' does not run on JAX arrays ({type(err).__name__}: {err}). Pass'
      f' {fix} instead.'
    ) from None


def prepare(
  state_dict: Mapping[str, Any],
  *,
  layout: str,
  activation: str | Callable[..., Any] | None,
  prefix: str,
  strict: bool,
  param_dtype: Any,
  fused_gate_up: bool,
  layer_kwargs: Mapping[str, Any],
  fixed: tuple[str, ...],
  module_type: type,
) -> tuple[TorchFFN, dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Checks the arguments of ``from_torch`` and reads the state dict.

  Args:
    state_dict: as ``from_torch``'s.
    layout: as ``from_torch``'s.
    activation: as ``from_torch``'s.
    prefix: as ``from_torch``'s.
    strict: as ``from_torch``'s.
    param_dtype: as ``from_torch``'s.
    fused_gate_up: as ``from_torch``'s.
    layer_kwargs: the other layer options given to ``from_torch``.
    fixed: the layer options the state dict sets (passing one is an error).
    module_type: the framework's module class.

  Returns:
    ``(ffn, params, options)``: the parsed FFN, its params tree (fused as
    asked) and the keyword options of the layer (``activation``,
    ``use_bias``, ``param_dtype`` and ``layer_kwargs``).

  Raises:
    ValueError: see
    :func:`~flaxact._src.interop.torch.state_dict.parse_state_dict`. TypeError:
    see :func:`check_activation` and :func:`check_layer_kwargs`.
  """
  check_layer_kwargs(layer_kwargs, fixed)
  check_activation(activation, module_type)
  ffn = parse_state_dict(
    state_dict,
    layout=layout,
    activation=activation,
    prefix=prefix,
    strict=strict,
    param_dtype=param_dtype,
  )
  params = ffn.params(fused_gate_up)
  options = dict(
    activation=ffn.activation,
    use_bias=ffn.use_bias,
    param_dtype=ffn.param_dtype,
    **layer_kwargs,
  )
  if ffn.gated:
    options['fused_gate_up'] = fused_gate_up
  return ffn, params, options
