"""Tests of ffn_hidden_features: the published widths and bad input."""

from __future__ import annotations

import pytest

import flaxact


@pytest.mark.parametrize(
  'features,kwargs,width',
  [
    (4096, {}, 11008),  # LLaMA 7B
    (5120, {}, 13824),  # LLaMA 13B
    (8192, {}, 22016),  # LLaMA 65B
    (4096, dict(ffn_dim_multiplier=1.3, multiple_of=1024), 14336),  # LLaMA 3 8B
    (
      8192,
      dict(ffn_dim_multiplier=1.3, multiple_of=4096),
      28672,
    ),  # LLaMA 2 70B
  ],
)
def test_published_widths(features, kwargs, width):
  assert flaxact.ffn_hidden_features(features, **kwargs) == width


def test_plain_ffn_is_multiplier_times_features():
  # BERT-base / GPT-2 small: 4 * 768, no 2/3, no rounding.
  assert flaxact.ffn_hidden_features(768, gated=False, multiple_of=1) == 3072


def test_rounds_up_to_multiple_of():
  assert flaxact.ffn_hidden_features(100, multiple_of=64) == 320  # 266 -> 320
  assert flaxact.ffn_hidden_features(1, multiple_of=256) == 256


def test_returns_int():
  assert type(flaxact.ffn_hidden_features(4096)) is int


@pytest.mark.parametrize('bad', [0, -4096, 4096.0, 2.5, '4096', True, None])
def test_bad_features(bad):
  with pytest.raises(
    ValueError, match=r'features must be a positive integer; got'
  ):
    flaxact.ffn_hidden_features(bad)


@pytest.mark.parametrize('arg', ['multiplier', 'multiple_of'])
@pytest.mark.parametrize('bad', [0, -1, 1.5])
def test_bad_integer_options(arg, bad):
  with pytest.raises(
    ValueError, match=f'{arg} must be a positive integer; got'
  ):
    flaxact.ffn_hidden_features(4096, **{arg: bad})


@pytest.mark.parametrize('bad', [0, -1.3, 'x', True])
def test_bad_ffn_dim_multiplier(bad):
  with pytest.raises(ValueError, match='ffn_dim_multiplier must be'):
    flaxact.ffn_hidden_features(4096, ffn_dim_multiplier=bad)
