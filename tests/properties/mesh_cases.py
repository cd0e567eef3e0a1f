"""Mesh == one device: the property that needs 8 simulated CPU devices.

Not collected by the ordinary run (no ``test_`` prefix):
``test_moe_mesh_properties.py`` runs this module with pytest in a child
process started by :func:`tests.multidevice.run_on_simulated_devices`.
Token counts that do not divide the mesh (1, 3, 5, 13 on 8 devices) are
padded inside; the output and the gradients must equal one device's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flaxact
from tests.multidevice import auto_mesh, require_devices
from tests.properties import moe_configs as mc
from tests.properties import profiles
from tests.properties.moe_configs import IMPLS, configs

DIFF = ('x', 'router_kernel', 'gate_kernel', 'up_kernel', 'down_kernel')


@functools.cache
def _mesh(explicit: bool):
  if explicit:
    return jax.make_mesh(
      (2, 4), ('data', 'expert'), axis_types=(AxisType.Explicit,) * 2
    )
  return auto_mesh((2, 4), ('data', 'expert'))


@functools.cache
def _value_and_grad(static: tuple, mesh):
  def loss(p, rest, cot):
    y, _ = flaxact.moe_ffn(**p, **rest, **dict(static), mesh=mesh)
    return jnp.vdot(y, cot), y

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _split(mesh, arrays: dict) -> dict:
  """The experts' arrays (``gate_*``, ``up_*``, ``down_*``) split over
  ``'expert'``; the others as they are."""
  split = NamedSharding(mesh, P('expert'))
  experts = ('gate', 'up', 'down')
  return {
    n: jax.device_put(a, split)
    if a is not None and n.split('_')[0] in experts
    else a
    for n, a in arrays.items()
  }


@profiles.ci_examples(3)
@given(configs(tokens=(1, 3, 5, 13)), st.sampled_from(IMPLS), st.booleans())
def test_mesh_equals_one_device(c, impl, explicit):
  require_devices(8)
  # the experts split over 4 devices; a mesh is dropless only (for now)
  c = dict(c, e=max(c['e'], 4), capacity=None)
  kind = 'Explicit' if explicit else 'Auto'
  note(mc.moe_call(c, impl=repr(impl)) + f'  # mesh data=2, expert=4 {kind}')
  w = mc.weights(c)
  p = {n: w[n] for n in DIFF}
  rest = {n: a for n, a in w.items() if n not in DIFF}
  cot = jax.random.normal(jax.random.key(c['seed'] + 1), w['x'].shape)
  static = tuple(mc.ffn_kwargs(c, impl=impl).items())
  mesh = _mesh(explicit)
  with jax.default_matmul_precision('highest'):
    (_, y_one), grads_one = _value_and_grad(static, None)(p, rest, cot)
    if explicit:  # expert arrays split over 'expert', as the layers' rules
      p, rest = _split(mesh, p), _split(mesh, rest)
    with jax.set_mesh(mesh):
      (_, y), grads = _value_and_grad(static, mesh)(p, rest, cot)
  np.testing.assert_allclose(y, y_one, **mc.F32_FFN)
  for n in DIFF:
    np.testing.assert_allclose(grads[n], grads_one[n], **mc.F32_FFN, err_msg=n)
