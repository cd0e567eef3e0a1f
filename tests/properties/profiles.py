"""Hypothesis profiles of the property-based tests.

``ci`` (the default): fixed seed, derandomised, no example database, few
examples; the whole folder stays within about two minutes of CPU on two
workers. ``thorough`` (``HYPOTHESIS_PROFILE=thorough pytest
tests/properties``): thousands of random examples, for contributors before a
release or after touching the routed FFN; ``HYPOTHESIS_MAX_EXAMPLES`` sets
how many per property (default 2000). README.md ("Property-based tests")
lists the counts and times.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No explain phase: it reruns a failing example many times, each a compile.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
settings.register_profile(
  'ci',
  max_examples=20,
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
  """``n`` examples in the ``ci`` profile; the loaded profile's otherwise.

  For the properties whose examples compile most (transforms, layers,
  meshes): they keep CI cheap without capping the ``thorough`` run.
  """
  if PROFILE == 'ci':
    return settings(max_examples=n)
  return lambda f: f
