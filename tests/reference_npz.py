"""Reads the stored reference files ``tests/data/*.npz`` with numpy only.

Each file holds cases keyed ``name.field``: a field is an array, a string
(stored as a 0-d string array) or JSON text; ``name.group.rest`` is entry
``rest`` of one of a case's groups of arrays (a state dict, gradients). A key
without a dot is about the whole file (the library versions that wrote it).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

DATA = pathlib.Path(__file__).parent / 'data'


def load_cases(
  filename: str,
  *,
  groups: Sequence[str] = (),
  strings: Sequence[str] = (),
  json_fields: Sequence[str] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
  """The cases of ``tests/data/<filename>``, and its file-wide strings.

  Args:
    filename: the file's name in ``tests/data/``.
    groups: fields that are dicts of arrays (every case has each, maybe
      empty).
    strings: fields read as ``str``.
    json_fields: fields read as JSON text.

  Returns:
    ``(cases, about)``: per case name its fields in file order, the groups
    first; and the dot-less keys as strings.
  """
  cases: dict[str, dict[str, Any]] = {}
  about: dict[str, str] = {}
  with np.load(DATA / filename) as data:
    for key in data.files:
      if '.' not in key:
        about[key] = str(data[key])
        continue
      name, field = key.split('.', 1)
      case = cases.setdefault(name, {g: {} for g in groups})
      group, _, rest = field.partition('.')
      if group in groups and rest:
        case[group][rest] = data[key]
      elif field in strings:
        case[field] = str(data[key])
      elif field in json_fields:
        case[field] = json.loads(str(data[key]))
      else:
        case[field] = data[key]
  return cases, about
