"""Shows the options a layer inherits on the layer's own API page.

The Linen and NNX layers keep their shared options (``use_bias``,
``dtype``, ``remat``, ...) as fields of one base class per framework, whose
docstring lists them once under ``Attributes:`` (Linen) or ``Args:`` (NNX).
That base class is not public, so this hook appends those entries to the
same section of each public subclass while the page is built (before
napoleon reads the docstring), leaving out the names the subclass documents
itself or does not take; the source stays as it is.
"""

from __future__ import annotations

import inspect
import re


def _sections(lines: list[str]) -> dict[str, tuple[int, int]]:
  """``header -> (start, end)`` line ranges of the Google-style sections."""
  starts = [
    (i, line[:-1])
    for i, line in enumerate(lines)
    if line.endswith(':') and line[:1].isalpha() and ' ' not in line.strip()
  ]
  ranges = {}
  for n, (i, name) in enumerate(starts):
    end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
    while end > i + 1 and not lines[end - 1].strip():
      end -= 1
    ranges[name] = (i, end)
  return ranges


def _public_objects() -> list[object]:
  import flaxact.linen
  import flaxact.nnx

  return [
    getattr(module, name)
    for module in (flaxact.linen, flaxact.nnx)
    for name in module.__all__
  ]


def _private_bases(cls) -> list[type]:
  """Bases defined in flaxact that have no page of their own."""
  public = _public_objects()
  return [
    base
    for base in cls.__mro__[1:]
    if base.__module__.startswith('flaxact.')
    and not any(base is obj for obj in public)
    and (
      'Attributes:' in (base.__doc__ or '') or 'Args:' in (base.__doc__ or '')
    )
  ]


def _entries(lines: list[str], start: int, end: int) -> list[list[str]]:
  """The entries (first line and continuation lines) of a section."""
  entries: list[list[str]] = []
  for line in lines[start + 1 : end]:
    if (line.startswith('  ') and not line.startswith('   ')) or not entries:
      entries.append([line])
    else:
      entries[-1].append(line)
  return entries


def _name(entry: list[str]) -> str:
  return entry[0].strip().split(':')[0].split(' ')[0]


def _parameters(cls) -> set[str] | None:
  """The names a class takes, or ``None`` when its signature is unknown."""
  try:
    return set(inspect.signature(cls.__init__).parameters)
  except (TypeError, ValueError):
    return None


def _signature(app, what, name, obj, options, signature, return_annotation):
  """NNX classes show ``__init__``'s signature, not the metaclass's."""
  if what != 'class' or signature != '(*args, **kwargs)':
    return None
  init = inspect.signature(obj.__init__)
  params = [
    p.replace(annotation=inspect.Parameter.empty)
    for p in list(init.parameters.values())[1:]
  ]
  plain = init.replace(
    parameters=params, return_annotation=inspect.Signature.empty
  )
  return re.sub(r' at 0x[0-9a-f]+>', '>', str(plain)), None


def _process(app, what, name, obj, options, lines) -> None:
  if what != 'class' or not name.startswith('flaxact.'):
    return
  takes = _parameters(obj)
  for base in _private_bases(obj):
    base_lines = inspect.cleandoc(base.__doc__ or '').splitlines()
    base_sections = _sections(base_lines)
    for section in ('Attributes', 'Args'):
      if section not in base_sections:
        continue
      own = _sections(lines)
      have = set()
      if section in own:
        have = {_name(e) for e in _entries(lines, *own[section])}
      new = [
        line
        for entry in _entries(base_lines, *base_sections[section])
        if _name(entry) not in have and (takes is None or _name(entry) in takes)
        for line in entry
      ]
      if not new:
        continue
      if section in own:
        at = own[section][1]
        lines[at:at] = new
      else:
        lines += ['', f'{section}:', *new]


def setup(app):
  """Connects the hook ahead of napoleon (priority 400 < 500)."""
  app.setup_extension('sphinx.ext.autodoc')
  app.connect('autodoc-process-docstring', _process, priority=400)
  app.connect('autodoc-process-signature', _signature)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
