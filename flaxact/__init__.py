"""flaxact: accurate activations, lean gated FFNs and routed MoE for JAX.

Element-wise activations, split-form gated functions (value first, gate
second), the two-array gated product (and GPT-OSS's ``gpt_oss_glu``), the
name registry and the LLaMA hidden width rule; the routed FFN (mixture of
experts) as a function of plain arrays (``moe_ffn`` and its ``MoEAux``), its
routers (``top_k_routing``) and their auxiliary losses and bias update. Flax
layers (``FFN``, ``GatedFFN``, ``MoE``, ``from_torch``, ...) live in
:mod:`flaxact.linen` and :mod:`flaxact.nnx`; ``import flaxact`` does not
import Flax.

**``flaxact.gelu`` defaults to the exact (erf) form**, like PyTorch; use
``flaxact.gelu_tanh`` for ``jax.nn.gelu``'s default.
"""

from importlib import metadata as _metadata

from flaxact._src.activations.exponential import celu as celu
from flaxact._src.activations.exponential import elu as elu
from flaxact._src.activations.exponential import selu as selu
from flaxact._src.activations.gated import bilinear as bilinear
from flaxact._src.activations.gated import geglu as geglu
from flaxact._src.activations.gated import geglu_tanh as geglu_tanh
from flaxact._src.activations.gated import glu as glu
from flaxact._src.activations.gated import reglu as reglu
from flaxact._src.activations.gated import swiglu as swiglu
from flaxact._src.activations.gated_product import (
  gated_product as gated_product,
)
from flaxact._src.activations.gelu import gelu as gelu
from flaxact._src.activations.gelu import gelu_10 as gelu_10
from flaxact._src.activations.gelu import gelu_tanh as gelu_tanh
from flaxact._src.activations.gpt_oss import gpt_oss_glu as gpt_oss_glu
from flaxact._src.activations.laplace import laplace as laplace
from flaxact._src.activations.piecewise import hard_sigmoid as hard_sigmoid
from flaxact._src.activations.piecewise import hard_silu as hard_silu
from flaxact._src.activations.piecewise import identity as identity
from flaxact._src.activations.piecewise import leaky_relu as leaky_relu
from flaxact._src.activations.piecewise import relu as relu
from flaxact._src.activations.piecewise import relu6 as relu6
from flaxact._src.activations.piecewise import relu_squared as relu_squared
from flaxact._src.activations.registry import ACTIVATIONS as ACTIVATIONS
from flaxact._src.activations.registry import get_activation as get_activation
from flaxact._src.activations.sigmoid import sigmoid as sigmoid
from flaxact._src.activations.sigmoid import softplus as softplus
from flaxact._src.activations.sigmoid import sqrt_softplus as sqrt_softplus
from flaxact._src.activations.sigmoid import tanh as tanh
from flaxact._src.activations.swish import mish as mish
from flaxact._src.activations.swish import quick_gelu as quick_gelu
from flaxact._src.activations.swish import silu as silu
from flaxact._src.activations.swish import swish as swish
from flaxact._src.activations.xielu import xielu as xielu
from flaxact._src.layers.hidden import (
  ffn_hidden_features as ffn_hidden_features,
)
from flaxact._src.moe.api import MoEAux as MoEAux
from flaxact._src.moe.api import moe_ffn as moe_ffn
from flaxact._src.moe.losses import load_balancing_loss as load_balancing_loss
from flaxact._src.moe.losses import router_z_loss as router_z_loss
from flaxact._src.moe.losses import (
  sequence_balance_loss as sequence_balance_loss,
)
from flaxact._src.moe.routers import top_k_routing as top_k_routing
from flaxact._src.moe.routers import (
  update_score_correction_bias as update_score_correction_bias,
)


def __getattr__(name: str):
  """``flaxact.linen`` and ``flaxact.nnx``, imported on first use.

  ``import flaxact`` imports no Flax; the layer namespaces load when first
  read, so ``import flaxact; flaxact.nnx.MoE`` works as
  ``from flaxact import nnx`` does.
  """
  if name in ('linen', 'nnx'):
    import importlib

    return importlib.import_module(f'flaxact.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


try:
  __version__ = _metadata.version('flaxact')
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
  __version__ = '0.0.0+unknown'

__all__ = [
  'ACTIVATIONS',
  'MoEAux',
  'bilinear',
  'celu',
  'elu',
  'ffn_hidden_features',
  'gated_product',
  'geglu',
  'geglu_tanh',
  'gelu',
  'gelu_10',
  'gelu_tanh',
  'get_activation',
  'glu',
  'gpt_oss_glu',
  'hard_sigmoid',
  'hard_silu',
  'identity',
  'laplace',
  'leaky_relu',
  'load_balancing_loss',
  'mish',
  'moe_ffn',
  'quick_gelu',
  'reglu',
  'relu',
  'relu6',
  'relu_squared',
  'router_z_loss',
  'selu',
  'sequence_balance_loss',
  'sigmoid',
  'silu',
  'softplus',
  'sqrt_softplus',
  'swiglu',
  'swish',
  'tanh',
  'top_k_routing',
  'update_score_correction_bias',
  'xielu',
]
