"""The hidden-width rule of LLaMA-style feed-forward blocks."""

from __future__ import annotations

import numbers

from flaxact._src.common.checks import check_positive_int


def ffn_hidden_features(
  features: int,
  *,
  gated: bool = True,
  multiplier: int = 4,
  ffn_dim_multiplier: float | None = None,
  multiple_of: int = 256,
) -> int:
  r"""The hidden width of a (gated) FFN, by the LLaMA rule.

  .. math::
    h = \mathrm{multiple\_of} \cdot \left\lceil
      \frac{\lfloor m \lfloor \tfrac{2}{3} k d \rfloor \rfloor}
      {\mathrm{multiple\_of}} \right\rceil

  with :math:`d` = ``features``, :math:`k` = ``multiplier``, the factor 2/3
  only when ``gated`` (a gated FFN has three matrices instead of two, so 2/3
  of the width keeps the parameter count) and :math:`m` =
  ``ffn_dim_multiplier`` when given.

  Args:
    features: the model width ``d`` (``embed``), a positive integer.
    gated: apply the 2/3 factor of gated FFNs.
    multiplier: the plain FFN's expansion factor (4 in most transformers).
    ffn_dim_multiplier: an extra factor (LLaMA 2 70B and LLaMA 3 use 1.3).
    multiple_of: round the width up to a multiple of this.

  Returns:
    The hidden width, a positive ``int``.

  Raises:
    ValueError: if ``features``, ``multiplier`` or ``multiple_of`` is not a
      positive integer, or ``ffn_dim_multiplier`` is not a positive number.

  Examples:
    >>> import flaxact
    >>> flaxact.ffn_hidden_features(4096)  # LLaMA 7B
    11008
    >>> flaxact.ffn_hidden_features(8192, ffn_dim_multiplier=1.3,
    ...                             multiple_of=4096)  # LLaMA 2 70B
    28672

  References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
    2023. https://arxiv.org/abs/2302.13971
  """
  features = check_positive_int(features, 'features')
  multiplier = check_positive_int(multiplier, 'multiplier')
  multiple_of = check_positive_int(multiple_of, 'multiple_of')
  hidden = multiplier * features
  if gated:
    hidden = int(2 * hidden / 3)
  if ffn_dim_multiplier is not None:
    if isinstance(ffn_dim_multiplier, bool) or not isinstance(
      ffn_dim_multiplier, numbers.Real
    ):
      raise ValueError(
        'ffn_dim_multiplier must be a positive number or None; got'
        f' {ffn_dim_multiplier!r}.'
      )
    if not ffn_dim_multiplier > 0:
      raise ValueError(
        f'ffn_dim_multiplier must be positive; got {ffn_dim_multiplier}.'
      )
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * -(-max(hidden, 1) // multiple_of)
