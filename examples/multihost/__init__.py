"""Multi-host training of a small MoE language model, in five modules.

The core of ``multihost.py`` (JAX's multi-controller runtime: one Python
process per host, one global mesh over every host's devices):

- ``multihost.cluster``: which process this is (flags, the environment
  variables cluster launchers set, or JAX's own cluster detection), the
  local launcher of ``--num-processes N``, and ``jax.distributed``;
- ``multihost.lm``: the decoder LM (``charlm``'s transformer with flaxact
  SwiGLU and MoE blocks), the ``data x expert`` mesh and its rules, the
  data stream whose position is a number, process-local batches and the
  jit-compiled steps;
- ``multihost.checkpoints``: sharded, asynchronous, atomic Orbax
  checkpoints of parameters, optimizer state, step and data position;
- ``multihost.serve``: a checkpoint restored onto another topology (one
  process on an ``expert`` mesh, one device, Qwix int8 PTQ);
- ``multihost.report``: the results table and the plot.

The corpus, the optimiser and the flags of the transformer are ``charlm``'s.
The package shares its name with the script: run ``python
examples/multihost.py``; ``import multihost`` (with ``examples/`` on the
path) finds this package, since a package wins over a module of the same
name.
"""
