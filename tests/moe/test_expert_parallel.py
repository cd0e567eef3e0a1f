"""Expert parallelism on 8 simulated CPU devices (mesh data=2, expert=4).

One subprocess (the device count is fixed when JAX starts) checks that each
device holds a quarter of every expert kernel's experts axis, that the
forward and the gradients equal the single-device function, and that the
compiled step moves tokens with all-to-all and never all-gathers a kernel.
"""

from __future__ import annotations

import textwrap

from tests.multidevice import run_on_simulated_devices

SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, re
  from jax.sharding import NamedSharding, PartitionSpec as P
  import flaxact

  mesh = jax.make_mesh((2, 4), ('data', 'expert'))
  T, D, H, E, K = 64, 16, 24, 8, 2
  ks = jax.random.split(jax.random.key(0), 6)
  args = (
    jax.random.normal(ks[0], (T, D)), jax.random.normal(ks[1], (D, E)),
    jax.random.normal(ks[2], (E, D, H)) / 4,
    jax.random.normal(ks[3], (E, D, H)) / 4,
    jax.random.normal(ks[4], (E, H, D)) / 5,
  )
  specs = (P(('data', 'expert')), P(), P('expert'), P('expert'), P('expert'))

  def loss(*a, mesh=None, impl='loop'):
    y, aux = flaxact.moe_ffn(*a, experts_per_token=K, mesh=mesh, impl=impl,
                             tile_size=8)
    return jnp.sum(y ** 2) + aux.load_balancing_loss

  with jax.default_matmul_precision('highest'):
    ref = jax.value_and_grad(loss, argnums=tuple(range(5)))(*args)
    put = [jax.device_put(a, NamedSharding(mesh, s))
           for a, s in zip(args, specs)]
    for impl in ('loop', 'ragged'):
      step = jax.jit(jax.value_and_grad(
        lambda *a: loss(*a, mesh=mesh, impl=impl), argnums=tuple(range(5))))
      val, grads = step(*put)
      np.testing.assert_allclose(val, ref[0], rtol=1e-5)
      for g, r in zip(grads, ref[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r),
                                   rtol=1e-4, atol=1e-5)
      for g in grads[2:]:
        assert g.sharding.spec[0] == 'expert', g.sharding
        assert g.addressable_shards[0].data.shape[0] == E // 4
      hlo = step.lower(*put).compile().as_text()
      assert 'all-to-all' in hlo
      for line in hlo.splitlines():
        if ' all-gather(' in line:
          shape = line.split('=')[1].split('all-gather')[0]
          assert str(D) + ',' + str(H) not in shape, line
          assert str(H) + ',' + str(D) not in shape, line
  print('EP OK')
  """
)


def test_expert_parallel_on_8_simulated_devices():
  done = run_on_simulated_devices('-c', SCRIPT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'EP OK' in done.stdout
