"""Hypothesis profiles of the property-based tests.

``ci`` (the default): fixed seed, derandomised, no example database, few
examples; the whole folder stays within a few minutes of CPU. ``thorough``
(``HYPOTHESIS_PROFILE=thorough pytest tests/properties``): thousands of
random examples, for contributors before a release or after touching the
routed FFN; ``HYPOTHESIS_MAX_EXAMPLES`` caps it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
  'ci',
  max_examples=20,
  derandomize=True,
  database=None,
  deadline=None,
  print_blob=True,
  suppress_health_check=_SLOW,
)
settings.register_profile(
  'thorough',
  max_examples=int(os.environ.get('HYPOTHESIS_MAX_EXAMPLES', 2000)),
  deadline=None,
  database=None,
  print_blob=True,
  suppress_health_check=_SLOW,
)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
