"""Qwix QAT of the experts on the grouped path: Qwix's numerics, our matmul.

Under ``qwix.QtProvider`` the ``'dense'`` formulation hands Qwix one
``dot_general`` per expert projection, rows ``(rows, E, in)`` times the
stacked kernel ``(E, in, out)``. For a rule with Qwix's default options
(no static activation scales, no sub-channel tiles, no backward
quantization) Qwix then computes, per projection:

- forward: the kernel quantized per expert and output channel (every
  non-contracting axis is a channel) and, with ``act_qtype``, the rows per
  row (per token for gate/up, per assignment for down), then the matmul;
- backward (``use_original_residuals``, Qwix's default without
  ``bwd_qtype``): the float matmul's gradients, ``g @ W^T`` and
  ``x^T @ g``, with the original (unquantized) kernel and rows.

The grouped impls do the same: :class:`QatProduct` carries each
projection's settings (read from the rule by the layer); the forward pass
runs on the kernels quantized by :func:`forward_kernels` and rows
quantized by :func:`act_quantizers`, the backward pass on the original
kernels and rows, with Qwix's own ``quantize`` and ``dequantize``. Any other
rule leaves the experts to ``'dense'`` (:func:`qat_configs` returns
``None``).

Examples:
  >>> import jax.numpy as jnp
  >>> from flaxact._src.moe.experts import fake_quant
  >>> fake_quant.act_quantizers(lambda g, u: g * u)[0] is fake_quant.identity
  True
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

Array = jax.Array

#: QtRule fields that must keep their defaults for the grouped path.
_DEFAULTS = {
  'act_static_scale': (None, False),
  'tile_size': (None,),
  'bwd_qtype': (None,),
  'disable_channelwise_axes': (False,),
  'additional_qt_config': (None,),
}


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """One projection's QAT settings (``None`` qtype: not quantized)."""

  weight_qtype: Any = None
  weight_method: str = 'absmax'
  act_qtype: Any = None
  act_method: str = 'absmax'


@dataclasses.dataclass(frozen=True)
class QatProduct:
  """A gated product carrying the experts' QAT settings (gate, up, down)."""

  product: Callable[[Array, Array], Array]
  configs: tuple[QatConfig, ...]  # gate, up, down

  def __call__(self, g: Array, u: Array) -> Array:
    return self.product(g, u)


def qat_configs(rules: Sequence[Any]) -> tuple[QatConfig, ...] | None:
  """The three projections' settings, or ``None`` if any needs ``'dense'``.

  Args:
    rules: the Qwix rule of ``gate_proj``, ``up_proj`` and ``down_proj``.

  Returns:
    ``None`` unless every rule is ``None`` (that projection stays float) or
    a ``qwix.QtRule`` (QAT; PTQ and LoRA rules need their ``dot_general``)
    with the defaults of :data:`_DEFAULTS`, and one is a ``QtRule``.
  """
  if 'qwix' not in sys.modules:
    return None
  import qwix

  if not any(isinstance(rule, qwix.QtRule) for rule in rules):
    return None
  configs = []
  for rule in rules:
    if rule is None:  # no rule: this projection stays float
      configs.append(QatConfig())
      continue
    if not isinstance(rule, qwix.QtRule):
      return None
    for field, allowed in _DEFAULTS.items():
      if getattr(rule, field, None) not in allowed:
        return None
    if rule.weight_qtype is None and rule.act_qtype is None:
      return None
    configs.append(
      QatConfig(
        rule.weight_qtype,
        rule.weight_calibration_method,
        rule.act_qtype,
        rule.act_calibration_method or 'absmax',
      )
    )
  return tuple(configs)


def _fake_quant(a: Array, qtype: Any, method: str, axes) -> Array:
  import qwix

  q = qwix.quantize(a, qtype, channelwise_axes=axes, calibration_method=method)
  return qwix.dequantize(q).astype(a.dtype)


def identity(a: Array) -> Array:
  """``a``: no quantization."""
  return a


def forward_kernels(prod: Any, kernels: tuple[Any, ...]) -> tuple[Any, ...]:
  """The kernels the forward pass uses: quantized per expert and channel."""
  if not isinstance(prod, QatProduct):
    return kernels
  return tuple(
    k
    if c.weight_qtype is None
    else _fake_quant(k, c.weight_qtype, c.weight_method, (0, 2))
    for k, c in zip(kernels, prod.configs, strict=True)
  )


def act_quantizers(prod: Any) -> tuple[Callable[[Array], Array], ...]:
  """``(gate, up, down)`` row quantizers of the forward pass' matmul inputs."""
  if not isinstance(prod, QatProduct):
    return (identity,) * 3

  def per_row(c: QatConfig):
    if c.act_qtype is None:
      return identity
    return lambda a: _fake_quant(
      a, c.act_qtype, c.act_method, tuple(range(a.ndim - 1))
    )

  return tuple(per_row(c) for c in prod.configs)
