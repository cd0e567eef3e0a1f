"""Loads the Hypothesis profile (``tests/properties/profiles.py``)."""

from __future__ import annotations

from tests.properties import profiles  # noqa: F401  (registers and loads)
