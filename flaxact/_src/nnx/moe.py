"""Flax NNX routed FFN: the mixture-of-experts layer ``MoE``.

Attributes (``E`` experts, input width ``d``, expert hidden width ``h``;
biases with ``router_use_bias`` / ``use_bias``, else ``None``)::

  router              kernel (d, E)      ('embed', None); bias (E,)
  gate_proj           kernel (E, d, h)   ('exp', 'embed', 'mlp'); bias (E, h)
  up_proj             kernel (E, d, h)   ('exp', 'embed', 'mlp'); bias (E, h)
  down_proj           kernel (E, h, out) ('exp', 'mlp', 'embed'); bias (E, out)
  shared_expert       a GatedFFN (with shared_hidden_features), else None
  shared_expert_gate  kernel (d, 1) (Qwen2-MoE), else None
  score_correction_bias  (E,) float32 nnx.BatchStat (sigmoid), else None

``score_correction_bias`` is an ``nnx.BatchStat``, not an ``nnx.Param``:
``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone; the
caller moves it with :func:`flaxact.update_score_correction_bias`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from flaxact import nnx as fx
  >>> layer = fx.MoE(16, 32, 4, 2, rngs=nnx.Rngs(0))
  >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
  {'down_proj': {'kernel': (4, 32, 16)},
   'gate_proj': {'kernel': (4, 16, 32)},
   'router': {'kernel': (16, 4)},
   'up_proj': {'kernel': (4, 16, 32)}}
  >>> y, aux = nnx.capture(layer, nnx.Intermediate)(jnp.ones((2, 5, 16)))
  >>> y.shape, sorted(aux)
  ((2, 5, 16), ['expert_load', 'load_balancing_loss', 'router_z_loss',
               'sequence_balance_loss'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import DotGeneralT, Dtype, Initializer, PrecisionLike

from flaxact._src.common import checks, tracing
from flaxact._src.layers import moe_body, projection, remat, sharding
from flaxact._src.layers.projection import DotGeneralCls, ProjectionOptions
from flaxact._src.moe.api import expert_product
from flaxact._src.moe.experts.api import Impl
from flaxact._src.moe.jitter import check_jitter, jitter
from flaxact._src.moe.settings import Router, RoutingSettings
from flaxact._src.moe.token_mask import check_token_mask
from flaxact._src.nnx import base, experts, router_noise
from flaxact._src.nnx.base import LayerBase
from flaxact._src.nnx.gated import GatedFFN
from flaxact._src.nnx.projection import (
  Projection,
  default_bias_init,
  default_kernel_init,
)

Array = jax.Array


class MoE(LayerBase):
  r"""A routed FFN (mixture of experts): ``k`` of ``E`` expert FFNs per token.

  .. math::
    y = \sum_{e \in \mathrm{top}_k(x)} w_e(x)\,
        \big(\mathrm{act}(x G_e) \odot x U_e\big) D_e
        \;+\; \mathrm{shared}(x)

  **Dropless by default**: every token reaches all ``k`` chosen experts
  whatever the load; ``capacity_factor=c`` keeps at most
  ``ceil(c * tokens * k / E)`` assignments per expert, dropping the overflow
  in token order. The router computes in float32: ``'softmax'`` (Mixtral,
  Qwen-MoE, OLMoE, GPT-OSS) or ``'sigmoid'`` (DeepSeek-V3, with the
  non-trainable ``score_correction_bias`` and optional group-limited
  routing); see :func:`flaxact.top_k_routing`. Ties go to the lower expert
  index.

  Each call records ``load_balancing_loss`` (on ``softmax(logits)`` whatever
  the router), ``sequence_balance_loss`` (DeepSeek-V3's sequence-wise loss,
  :func:`flaxact.sequence_balance_loss` with this router's scores: the
  sequences are the input's second-to-last axis, ``(..., seq, d)``; a
  ``(T, d)`` input is one sequence), ``router_z_loss`` and ``expert_load``
  (``(E,)`` int32 tokens routed to each expert), and with a
  ``capacity_factor`` ``dropped_assignments`` (the assignments this call
  dropped), as ``nnx.Intermediate`` (``self.sow``) when called
  under ``nnx.capture`` (Flax 0.12's way to collect intermediates; outside
  it nothing is recorded): ``y, aux = nnx.capture(layer,
  nnx.Intermediate)(x)``, each value a one-element tuple per call. Add the
  losses to the training loss yourself: they are never added to the
  output.

  ``token_mask`` (the call's, ``x.shape[:-1]`` bool, ``True`` = a real
  token) leaves padding out: masked tokens reach no expert (no expert
  computes for them), get no routed output, take no capacity slot (the
  capacity ``ceil(c * T * k / E)`` still counts every position of ``x`` in
  ``T``) and count in no recorded statistic or loss. The shared expert, a
  dense FFN, still runs on every token, so a masked token's output is the
  shared expert's (zero without one).

  ``router_jitter_noise=eps`` multiplies the router's input (not the
  experts') by ``U(1 - eps, 1 + eps)`` noise in training, as
  ``nnx.Dropout``: while ``deterministic`` is ``False`` (the attribute, set
  by ``layer.train()``/``layer.eval()``, or the call's argument), drawn
  from the ``'dropout'`` stream of ``rngs`` (or ``'default'``) kept at
  construction or from the call's ``rngs=``.

  The router, ``shared_expert`` and ``shared_expert_gate`` are ordinary
  projections: ``dot_general``/``dot_general_cls`` hooks and Qwix reach them
  as in :class:`GatedFFN`. The experts reach them through ``impl='dense'``:
  each of ``gate_proj``, ``up_proj`` and ``down_proj`` runs one
  ``dot_general`` (or the hook; ``dot_general_cls`` makes one instance per
  projection) over its whole stacked kernel, every expert on every token,
  as a hand-written MoE does, so Qwix QAT/PTQ/LoRA and AQT quantize the
  experts per expert and output channel. ``impl='auto'`` picks it by itself
  under a ``dot_general`` hook or while ``jax.lax.dot_general`` is
  intercepted (Qwix); dropless it costs ``E / k`` times the experts' FLOPs
  of the grouped impls (with ``capacity_factor=c`` each expert computes its
  capacity slots only: about ``c`` times). With ``remat=True`` the
  backward pass keeps two ``(T·k, hidden)`` arrays (``'moe_gate'``,
  ``'moe_up'``; ``(E, rows, hidden)`` with ``'dense'``), the small routing
  results (``'moe_routing'``: router logits, top-k weights and experts, the
  sorted layout) and the shared expert's two. Under a mesh whose logical
  axis rules map ``'exp'`` to a mesh axis (:data:`EXPERT_PARALLEL_RULES`),
  the grouped impls run expert-parallel with all-to-all, and ``'dense'``
  leaves the partitioning to ``jit``; no expert kernel is gathered.

  Args:
    in_features: the input width (``'embed'``).
    hidden_features: each expert's hidden width (``'mlp'``).
    num_experts: ``E``, the number of routed experts (``'exp'``).
    experts_per_token: ``k``, in ``[1, E]``.
    activation: the gate's element-wise activation (registry name or
      function): ``act(gate) * up``.
    gated_product: a ``(gate, up) -> hidden`` function replacing it, e.g.
      ``functools.partial(flaxact.gpt_oss_glu, alpha=1.702, limit=7.0)``.
    router: ``'softmax'`` or ``'sigmoid'``.
    normalize_weights: renormalise the ``k`` weights to sum to 1.
    routed_scaling_factor: multiplies the routing weights (DeepSeek-V3).
    num_groups: sigmoid router: experts form this many equal groups.
    groups_per_token: sigmoid router: groups kept per token.
    router_use_bias: a router bias (GPT-OSS).
    shared_hidden_features: hidden width of an always-on shared expert
      (``shared_expert``, a :class:`GatedFFN`); ``None``: none.
    shared_expert_gate: Qwen2-MoE's ``sigmoid(x @ w)`` gate on the shared
      expert.
    capacity_factor: ``None`` (dropless) or a positive number.
    ep_capacity_factor: under expert parallelism, the per-peer row budget
      of the token exchange: each device sends at most
      ``ceil(ep_capacity_factor * T_local * k / ep)`` rows to each of the
      ``ep`` expert devices, dropping the overflow in token order (recorded
      as ``dropped_assignments`` and ``dropped_per_device``). ``None``:
      dropless, with exchange buffers for the worst case (``ep`` times the
      routed rows per device).
    use_bias: biases on the expert projections (GPT-OSS).
    out_features: the output width; ``None`` uses ``in_features``.
    dtype: the compute dtype; ``None`` uses the input's.
    param_dtype: the parameters' dtype.
    precision: matmul precision.
    kernel_init: initialiser of each expert's kernels (per expert, with its
      ``(in, out)`` shape), the router and the shared expert.
    bias_init: bias initialiser.
    dot_general: replaces :func:`jax.lax.dot_general` in every projection
      (the experts' with ``impl='dense'``).
    dot_general_cls: a class whose instances replace ``dot_general``, one
      per projection.
    impl: the experts' matmul: ``'loop'``, ``'tiles'``, ``'ragged'`` or
      ``'tokamax'`` (grouped, fused under a custom VJP; ``'tokamax'`` needs
      ``pip install tokamax``), or ``'dense'`` (plain ``dot_general`` per
      projection, what quantizers reach); all give the same result.
      ``'auto'``: ``'loop'`` on CPU, ``'tokamax'`` (when installed) or
      ``'ragged'`` on GPU/TPU, also for Qwix PTQ int8 kernels and Qwix QAT
      rules with default options (quantized as Qwix quantizes
      ``'dense'``); ``'dense'`` with a ``dot_general`` hook or under other
      Qwix rules (LoRA, static scales, ...). A grouped impl with a
      ``dot_general`` hook is an error; under Qwix with float kernels and
      no QAT rule it warns that the experts stay float. See
      ``docs/moe_quantized.md``.
    tile_size: rows per tile of the ``'loop'`` and ``'tiles'`` impls;
      ``None`` (default) picks it from the shape (as
      :func:`flaxact.moe_ffn` does).
    router_jitter_noise: ``eps`` in ``[0, 1)`` of the router input's jitter
      noise in training (Mixtral's ``router_jitter_noise``); 0: none.
    deterministic: the default of the call's ``deterministic``; ``False``
      (as ``nnx.Dropout``) applies the jitter noise. ``layer.eval()`` sets
      it to ``True``.
    remat: memory-lean backward (``nnx.remat`` with a policy that saves
      only the experts' gate and up pre-activations, ``'moe_gate'`` and
      ``'moe_up'``, the routing results, ``'moe_routing'``, and the shared
      expert's, ``'ffn_gate'`` and ``'ffn_up'``; everything else is
      recomputed).
    record_intermediates: also record the auxiliary outputs outside
      ``nnx.capture``, as ``nnx.Intermediate`` attributes of the layer (what
      ``nnx.bridge.to_linen`` returns under ``mutable=['intermediates']``).
    rngs: ``params`` initialises the weights; ``dropout`` (or ``default``)
      is kept for the jitter noise when ``router_jitter_noise > 0``.

  Raises:
    ValueError: for ``experts_per_token`` outside ``[1, num_experts]``, an
      unknown router or impl, a grouped impl with a ``dot_general`` hook,
      groups not dividing the experts, ``capacity_factor <= 0``,
      ``router_jitter_noise`` outside ``[0, 1)``, or (at the call) an input
      of another width or a ``token_mask`` of another shape.
    TypeError: for integer input, a ``token_mask`` that is not bool or a
      learnable activation module.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flaxact import nnx as fx
    >>> layer = fx.MoE(16, 64, 8, 2, router='sigmoid',
    ...                shared_hidden_features=64, rngs=nnx.Rngs(0))
    >>> layer.score_correction_bias.shape
    (8,)
    >>> layer(jnp.ones((4, 16), jnp.bfloat16)).dtype
    dtype(bfloat16)

  References:
    Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
    Mixture-of-Experts Layer", 2017; Jiang et al., "Mixtral of Experts",
    2024; DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024.
  """

  remat_names: ClassVar[tuple[str, ...]] = remat.MOE_NAMES

  experts_per_token = moe_body.RoutingField[int]()
  normalize_weights = moe_body.RoutingField[bool]()
  routed_scaling_factor = moe_body.RoutingField[float]()
  num_groups = moe_body.RoutingField['int | None']()
  groups_per_token = moe_body.RoutingField['int | None']()
  capacity_factor = moe_body.RoutingField['float | None']()
  ep_capacity_factor = moe_body.RoutingField['float | None']()
  impl = moe_body.RoutingField[str]()
  tile_size = moe_body.RoutingField['int | None']()

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    num_experts: int,
    experts_per_token: int,
    *,
    activation: str | Callable[..., Any] = 'silu',
    gated_product: Callable[[Array, Array], Array] | None = None,
    router: Router | str = 'softmax',
    normalize_weights: bool = True,
    routed_scaling_factor: float = 1.0,
    num_groups: int | None = None,
    groups_per_token: int | None = None,
    router_use_bias: bool = False,
    shared_hidden_features: int | None = None,
    shared_expert_gate: bool = False,
    capacity_factor: float | None = None,
    ep_capacity_factor: float | None = None,
    use_bias: bool = False,
    out_features: int | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: DotGeneralT | None = None,
    dot_general_cls: DotGeneralCls | None = None,
    impl: Impl | str = 'auto',
    tile_size: int | None = None,
    router_jitter_noise: float = 0.0,
    deterministic: bool = False,
    remat: bool = True,
    record_intermediates: bool = False,
    rngs: nnx.Rngs,
  ):
    options = ProjectionOptions(
      use_bias=use_bias,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dot_general=dot_general,
      dot_general_cls=dot_general_cls,
    )
    routing = RoutingSettings(
      experts_per_token=experts_per_token,
      router=router,
      normalize_weights=normalize_weights,
      routed_scaling_factor=routed_scaling_factor,
      num_groups=num_groups,
      groups_per_token=groups_per_token,
      capacity_factor=capacity_factor,
      ep_capacity_factor=ep_capacity_factor,
      impl=impl,
      tile_size=tile_size,
    )
    self.hooked = options.hooked
    self.routing = moe_body.check_options(
      type(self).__name__,
      routing,
      num_experts=num_experts,
      hidden_features=hidden_features,
      activation=activation,
      gated_product=gated_product,
      shared_hidden_features=shared_hidden_features,
      shared_expert_gate=shared_expert_gate,
      module_type=nnx.Module,
      hooked=self.hooked,
    )
    self.init_layer(
      in_features=in_features,
      hidden_features=hidden_features,
      out_features=out_features,
      activation=activation,
      dtype=dtype,
      remat=remat,
    )
    self.num_experts = int(num_experts)
    self.gated_product = gated_product
    self.precision = precision
    self.record_intermediates = bool(record_intermediates)
    name = type(self).__name__
    self.router_jitter_noise = check_jitter(router_jitter_noise, name)
    self.deterministic = deterministic
    self._build(options, router_use_bias, rngs)
    self._build_shared(
      options, shared_hidden_features, shared_expert_gate, rngs
    )
    # After the weights: with or without noise, the same seed gives the
    # same weights.
    self.rngs = nnx.data(base.keep_stream(rngs, self.router_jitter_noise))

  def _build(self, options, router_use_bias, rngs) -> None:
    d, e = self.in_features, self.num_experts
    self.router = Projection(
      d,
      (e,),
      axes=sharding.ROUTER_PROJ_AXES,
      options=dataclasses.replace(options, use_bias=router_use_bias),
      rngs=rngs,
    )
    self.gate_proj, self.up_proj, self.down_proj = experts.build_experts(
      d, self.hidden_features, self.out_features, e, options=options, rngs=rngs
    )
    self.score_correction_bias: nnx.BatchStat | None
    if self.routing.router == 'sigmoid':
      self.score_correction_bias = nnx.BatchStat(jnp.zeros((e,), jnp.float32))
    else:
      self.score_correction_bias = nnx.data(None)

  def _build_shared(self, options, hidden, gate, rngs) -> None:
    self.shared_expert: GatedFFN | None = nnx.data(None)
    self.shared_expert_gate: Projection | None = nnx.data(None)
    if hidden is None:
      return
    self.shared_expert, shared_gate = experts.build_shared(
      self.in_features,
      hidden,
      self.out_features,
      gate=gate,
      activation=self.activation,
      dtype=self.dtype,
      options=options,
      rngs=rngs,
    )
    if shared_gate is not None:
      self.shared_expert_gate = shared_gate

  def __call__(
    self,
    x: Array,
    *,
    deterministic: bool | None = None,
    rngs: Any = None,
    token_mask: Array | None = None,
  ) -> Array:
    """Applies the layer and records its auxiliary outputs.

    Args:
      x: input of shape ``(..., in_features)``, floating dtype.
      deterministic: ``False`` applies the router jitter noise; ``None``
        uses the attribute. Changes nothing when ``router_jitter_noise ==
        0`` (accepted for a drop-in swap with the dense FFNs).
      rngs: an ``nnx.Rngs``, ``RngStream`` or key for the jitter noise,
        instead of the stream kept at construction.
      token_mask: ``x.shape[:-1]`` bool, ``True`` for a real token;
        masked tokens get no routed output and count in no statistic.
        ``None``: every token is real.

    Returns:
      An array of shape ``(..., out_features)`` in ``dtype`` (by default the
      input's dtype).

    Raises:
      TypeError: if ``x`` is not floating point or ``token_mask`` not bool.
      ValueError: if the last axis of ``x`` is not ``in_features``,
        ``token_mask`` has another shape than ``x.shape[:-1]``, or for
        jitter noise in training without an rng.
    """
    name = type(self).__name__
    x = checks.check_layer_input(x, name, self.in_features)
    mask = check_token_mask(token_mask, x.shape[:-1], name)
    key = router_noise.jitter_key(self, deterministic, rngs)
    with tracing.seen(x, nnx.state(self)):  # what remat would hide
      out = self.run(MoE._forward, x, key, mask)
    y, aux = cast(tuple[Array, moe_body.Aux], out)
    for name, value in aux.recorded().items():
      if hasattr(self, '__captures__'):  # inside nnx.capture
        self.sow(nnx.Intermediate, name, value)
      elif self.record_intermediates:  # what nnx.bridge.to_linen reads
        old = getattr(self, name, None)
        values = old.get_value() if isinstance(old, nnx.Intermediate) else ()
        setattr(self, name, nnx.Intermediate((*values, value)))
    return y

  def _forward(
    self, x: Array, key: Array | None, mask: Array | None
  ) -> tuple[Array, Any]:
    dtype = projection.layer_dtype(x, self.dtype)
    router_in = x if key is None else jitter(x, key, self.router_jitter_noise)
    logits = self.router(
      router_in, dtype=jnp.promote_types(x.dtype, jnp.float32)
    )
    bias = self.score_correction_bias
    experts = (self.gate_proj, self.up_proj, self.down_proj)
    xc = x.astype(dtype)
    y, aux = moe_body.routed(
      xc,
      logits,
      experts,
      routing=self.routing,
      product=expert_product(self.activation, self.gated_product),
      score_correction_bias=None if bias is None else bias[...],
      precision=self.precision,
      hooked=self.hooked,
      token_mask=mask,
    )
    if self.shared_expert is not None:
      # The shared expert before its gate, as in Linen: the same order of
      # operations, so input gradients are bit-identical too.
      shared = self.shared_expert(xc)
      gate = None
      if self.shared_expert_gate is not None:
        gate = self.shared_expert_gate(xc, dtype=dtype)
      y = moe_body.add_shared(y, shared, gate)
    return y, aux
