"""Hypothesis profiles of the property-based tests.

``ci`` (the default): fixed seed, derandomised, no example database, few
examples; the whole folder stays within about two minutes of CPU on two
workers. ``thorough`` (``HYPOTHESIS_PROFILE=thorough pytest
tests/properties``): random examples, for contributors before a release or
after touching the routed FFN; ``HYPOTHESIS_MAX_EXAMPLES`` sets how many
(default 2000) for the cheap properties, and :func:`ci_examples` gives the
expensive ones the same share of it as in ``ci``. README.md
("Property-based tests") lists the counts and times.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No explain phase: it reruns a failing example many times, each a compile.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
CI_EXAMPLES = 20
settings.register_profile(
  'ci',
  max_examples=CI_EXAMPLES,
  derandomize=True,
  database=None,
  deadline=None,
  print_blob=True,
  suppress_health_check=_SLOW,
  phases=_PHASES,
)
settings.register_profile(
  'thorough',
  max_examples=int(os.environ.get('HYPOTHESIS_MAX_EXAMPLES', 2000)),
  deadline=None,
  database=None,
  print_blob=True,
  suppress_health_check=_SLOW,
  phases=_PHASES,
)
PROFILE = os.environ.get('HYPOTHESIS_PROFILE', 'ci')
settings.load_profile(PROFILE)


def ci_examples(n: int):
  """``n`` of the profile's examples per ``CI_EXAMPLES`` (20).

  ``n`` examples in ``ci``; in ``thorough`` the same share of its count
  (at least 1). For the properties whose examples compile most
  (transforms, layers, meshes): CI stays cheap and a ``thorough`` run
  spends its time evenly.
  """
  total = settings.get_profile(PROFILE).max_examples
  return settings(max_examples=max(1, round(total * n / CI_EXAMPLES)))
