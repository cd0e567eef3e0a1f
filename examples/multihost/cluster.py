"""Which process this is, the local launcher, and ``jax.distributed``.

A multi-host JAX job runs one copy of the script per host. Each copy learns
three things: the coordinator's address (process 0's host and a free port),
how many processes there are, and its own id. They come, in this order of
precedence, from

1. flags: ``--coordinator-address``, ``--num-processes``, ``--process-id``;
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (set them from your launcher's own variables);
3. ``--auto-cluster``: JAX detects the cluster itself (SLURM, Open MPI,
   Kubernetes / GKE, Cloud TPU) from the variables those systems set.

``--num-processes N`` with no process id is the *local launcher*: the
script starts N copies of itself on this machine (coordinator
``127.0.0.1`` on a free port), forwards their output, and if one fails,
kills the others (a multi-controller job cannot go on without one of its
processes; a cluster scheduler does the same). Nothing here imports JAX at
module level, so the launcher never starts a JAX runtime of its own.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from _cli import UsageError

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process stands in the job."""

  num_processes: int
  process_id: int | None  # None: the launcher (or a single process)
  coordinator: str | None
  auto: bool = False  # jax.distributed.initialize() detects everything

  @property
  def launcher(self) -> bool:
    """``True`` when this process starts the others and trains nothing."""
    return self.num_processes > 1 and self.process_id is None and not self.auto

  @property
  def distributed(self) -> bool:
    """``True`` when this process joins a multi-process JAX job."""
    return self.auto or (self.num_processes > 1 and not self.launcher)


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if text is None or not text.strip():
    return None
  try:
    return int(text)
  except ValueError:
    raise UsageError(f'{name}={text!r} is not an integer') from None


def from_args(args) -> Cluster:
  """The cluster settings of the flags, falling back on the environment.

  Raises:
    UsageError: a process id outside ``[0, num_processes)``, a process id
      without a process count, a worker of several processes without a
      coordinator address, or ``--auto-cluster`` with explicit settings.
  """
  n = args.num_processes
  if n is None:
    n = _env_int(ENV_NUM_PROCESSES)
  pid = args.process_id if args.process_id is not None else None
  if pid is None:
    pid = _env_int(ENV_PROCESS_ID)
  address = args.coordinator_address or os.environ.get(ENV_COORDINATOR)
  if args.auto_cluster:
    if args.num_processes or args.process_id is not None:
      raise UsageError(
        '--auto-cluster lets JAX detect the process count and id; do not'
        ' pass --num-processes or --process-id with it'
      )
    return Cluster(0, None, address, auto=True)
  if pid is not None and n is None:
    raise UsageError(
      f'process id {pid} given without a process count (--num-processes or'
      f' {ENV_NUM_PROCESSES})'
    )
  n = 1 if n is None else n
  if n < 1:
    raise UsageError(f'the process count must be at least 1, got {n}')
  if pid is not None and not 0 <= pid < n:
    raise UsageError(f'process id {pid} is outside [0, {n}) for {n} processes')
  if pid is not None and n > 1 and not address:
    raise UsageError(
      f'process {pid} of {n} needs the coordinator address HOST:PORT'
      f' (--coordinator-address or {ENV_COORDINATOR})'
    )
  if address is not None:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
      raise UsageError(f'coordinator address {address!r} is not HOST:PORT')
  return Cluster(n, pid, address)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def worker_command(
  script: str, argv: Sequence[str], n: int, i: int, address: str
) -> list[str]:
  """The command line of local worker ``i`` of ``n``: ``argv`` plus its id."""
  return [
    sys.executable,
    script,
    *argv,
    '--num-processes',
    str(n),
    '--process-id',
    str(i),
    '--coordinator-address',
    address,
  ]


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
  """SIGKILLs every process of ``procs`` still running, and reaps it."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()


def launch(script: str, argv: Sequence[str], n: int) -> int:
  """Runs ``n`` workers of ``script`` on this machine; returns an exit code.

  Workers inherit stdout and stderr (only process 0 prints progress and
  results). When one exits with an error, the others are killed and its
  status is returned; ``KeyboardInterrupt`` kills them all.
  """
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  procs = [
    subprocess.Popen(worker_command(script, argv, n, i, address), env=env)
    for i in range(n)
  ]
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        kill_all(procs)
        print(
          f'multihost.py: process {i} exited with status {code}; stopped the'
          ' other processes',
          file=sys.stderr,
        )
        return code if code > 0 else 1
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    kill_all(procs)


def initialize(cluster: Cluster, cpu_devices: int) -> None:
  """Configures JAX for this process and joins the job.

  ``cpu_devices`` simulated CPU devices (the CPU backend only: a GPU or TPU
  host uses its accelerators). CPU collectives across processes go through
  Gloo. Call before anything creates a JAX backend.
  """
  import jax

  jax.config.update('jax_num_cpu_devices', cpu_devices)
  if not cluster.distributed:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if cluster.auto:
    jax.distributed.initialize(coordinator_address=cluster.coordinator)
  else:
    jax.distributed.initialize(
      coordinator_address=cluster.coordinator,
      num_processes=cluster.num_processes,
      process_id=cluster.process_id,
    )
