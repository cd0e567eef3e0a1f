"""Reading torch tensors as numpy arrays without importing torch."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def _jax_dtype_named(name: str) -> np.dtype | None:
  candidate = getattr(jnp, name, None)
  if candidate is None:
    return None
  try:
    return np.dtype(candidate)
  except TypeError:
    return None


def to_numpy(value: Any, key: str = 'value') -> np.ndarray:
  """Converts a torch tensor, JAX array or array-like to a numpy array.

  torch is not imported. A torch tensor is recognised by its ``detach``
  method and read as ``value.detach().cpu().numpy()``; a dtype numpy cannot
  represent (``torch.bfloat16``, ``torch.float8_e4m3fn``, ...) is read through
  ``.float()`` and cast back to the ``ml_dtypes`` type of the same name, which
  is exact because float32 holds every value of those dtypes.

  Args:
    value: a ``torch.Tensor``, ``numpy.ndarray``, ``jax.Array`` or anything
      ``numpy.asarray`` accepts.
    key: the state-dict key, used in error messages.

  Returns:
    A numpy array with the value's dtype.

  Raises:
    ValueError: if a tensor's dtype has no numpy or ``ml_dtypes`` equivalent.

  Examples:
    >>> import numpy as np
    >>> to_numpy(np.ones((2, 3), np.float32)).shape
    (2, 3)
  """
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, 'detach') and hasattr(value, 'numpy'):
    tensor = value.detach()
    if hasattr(tensor, 'cpu'):
      tensor = tensor.cpu()
    dtype_name = str(getattr(tensor, 'dtype', '')).removeprefix('torch.')
    try:
      return np.asarray(tensor.numpy())
    except TypeError:  # numpy cannot hold this dtype (e.g. bfloat16)
      target = _jax_dtype_named(dtype_name)
      if target is None or not hasattr(tensor, 'float'):
        raise ValueError(
          f'state_dict[{key!r}] has dtype {dtype_name!r}, which has no numpy'
          ' equivalent; convert it first, e.g. tensor.float().'
        ) from None
      return np.asarray(tensor.float().numpy()).astype(target)
  return np.asarray(value)


def describe_keys(keys: list[str], limit: int = 10) -> str:
  """``['a', 'b', ... (n more)]`` for an error message.

  Examples:
    >>> describe_keys(['a', 'b', 'c'], limit=2)
    "['a', 'b', ... (1 more)]"
  """
  shown = ', '.join(map(repr, keys[:limit]))
  more = f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''
  return f'[{shown}{more}]'
