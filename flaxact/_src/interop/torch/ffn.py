"""The framework-neutral description of a PyTorch FFN read by ``from_torch``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flaxact._src.interop.torch.layouts import GATE, UP


@dataclasses.dataclass(frozen=True)
class TorchFFN:
  """A PyTorch FFN's weights in Flax orientation, independent of framework.

  Attributes:
    layout: the layout name the weights were read with.
    gated: whether the FFN has a gate projection (``GatedFFN``) or not.
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
      gate, up = tree.pop(GATE), tree.pop(UP)
      tree['gate_up_proj'] = {
        k: np.stack([gate[k], up[k]], axis=-2) for k in gate
      }
    return tree
