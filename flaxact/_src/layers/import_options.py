"""The layer options ``from_torch`` passes through to the layer it builds.

A PyTorch state dict fixes a layer's widths, biases, activation and expert
count; everything else is the caller's choice, given to ``from_torch`` as
keywords and typed here (PEP 692), so a type checker sees a misspelt or
state-dict-fixed option. At run time ``from_torch`` names a fixed option in
a ``TypeError`` and the layer rejects an unknown one.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike
from typing_extensions import TypedDict

from flaxact._src.layers.projection import DotGeneralCls


class LayerOptions(TypedDict, total=False):
  """Options of the built layer; each is the layer's argument of that name.

  ``dropout_rate``, ``dropout_broadcast_dims``, ``deterministic`` and
  ``activations_in_float32`` apply to the dense layers, ``impl``,
  ``tile_size`` and ``capacity_factor`` to ``MoE``.
  """

  dtype: Dtype | None
  precision: PrecisionLike
  kernel_init: Initializer
  bias_init: Initializer
  dot_general: DotGeneralT | None
  dot_general_cls: DotGeneralCls | None
  remat: bool
  dropout_rate: float
  dropout_broadcast_dims: Sequence[int]
  deterministic: bool | None
  activations_in_float32: bool
  impl: str
  tile_size: int
  capacity_factor: float | None
