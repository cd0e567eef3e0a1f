"""Flax Linen routed FFN: the mixture-of-experts layer ``MoE``.

Parameters (``E`` experts, input width ``d``, expert hidden width ``h``;
biases with ``router_use_bias`` / ``use_bias``)::

  router              kernel (d, E)      ('embed', None); bias (E,)
  gate_proj           kernel (E, d, h)   ('exp', 'embed', 'mlp'); bias (E, h)
  up_proj             kernel (E, d, h)   ('exp', 'embed', 'mlp'); bias (E, h)
  down_proj           kernel (E, h, out) ('exp', 'mlp', 'embed'); bias (E, out)
  shared_expert       a GatedFFN (with shared_hidden_features)
  shared_expert_gate  kernel (d, 1) (Qwen2-MoE, with shared_expert_gate)

The sigmoid router's ``score_correction_bias`` ``(E,)`` float32 lives in the
non-trainable ``'batch_stats'`` collection (updated by the caller with
:func:`flaxact.update_score_correction_bias`, never by gradients).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from flaxact import linen as fl
  >>> layer = fl.MoE(32, num_experts=4, experts_per_token=2)
  >>> x = jnp.ones((2, 5, 16))
  >>> variables = layer.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, nn.unbox(variables))
  {'params': {'down_proj': {'kernel': (4, 32, 16)},
              'gate_proj': {'kernel': (4, 16, 32)},
              'router': {'kernel': (16, 4)},
              'up_proj': {'kernel': (4, 16, 32)}}}
  >>> y, state = layer.apply(variables, x, mutable=['intermediates'])
  >>> y.shape, sorted(state['intermediates'])
  ((2, 5, 16), ['expert_load', 'load_balancing_loss', 'router_z_loss',
               'sequence_balance_loss'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from flaxact._src.common import checks, tracing
from flaxact._src.layers import moe_body, projection, remat, sharding
from flaxact._src.linen import experts
from flaxact._src.linen.base import LayerBase
from flaxact._src.linen.gated import GatedFFN
from flaxact._src.linen.router_noise import jitter_key
from flaxact._src.moe.api import expert_product
from flaxact._src.moe.experts.api import Impl
from flaxact._src.moe.jitter import check_jitter, jitter
from flaxact._src.moe.settings import Router, RoutingSettings
from flaxact._src.moe.token_mask import check_token_mask

Array = jax.Array

#: The Linen collection of the sigmoid router's ``score_correction_bias``.
STATS = 'batch_stats'


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
  non-trainable ``score_correction_bias`` in ``'batch_stats'`` and optional
  group-limited routing); see :func:`flaxact.top_k_routing`. Ties go to the
  lower expert index.

  Each call records ``load_balancing_loss`` (on ``softmax(logits)`` whatever
  the router), ``sequence_balance_loss`` (DeepSeek-V3's sequence-wise loss,
  :func:`flaxact.sequence_balance_loss` with this router's scores: the
  sequences are the input's second-to-last axis, ``(..., seq, d)``; a
  ``(T, d)`` input is one sequence), ``router_z_loss`` and ``expert_load``
  (``(E,)`` int32 tokens routed to each expert) with
  ``self.sow('intermediates', ...)``, and with a ``capacity_factor``
  ``dropped_assignments`` (the assignments this call dropped); read them
  with ``apply(..., mutable=['intermediates'])`` and add the losses to the
  training loss yourself: they are never added to the output.

  ``token_mask`` (the call's, ``x.shape[:-1]`` bool, ``True`` = a real
  token) leaves padding out: masked tokens reach no expert (no expert
  computes for them), get no routed output, take no capacity slot (the
  capacity ``ceil(c * T * k / E)`` still counts every position of ``x`` in
  ``T``) and count in no recorded statistic or loss. The shared expert, a dense
  FFN, still runs on every token, so a masked token's output is the shared
  expert's (zero without one).

  ``router_jitter_noise=eps`` multiplies the router's input (not the
  experts') by ``U(1 - eps, 1 + eps)`` noise in training, as
  ``nn.Dropout``: with ``deterministic=False`` (the attribute or the call's
  argument) and a ``'dropout'`` rng.

  The router, ``shared_expert`` and ``shared_expert_gate`` are ordinary
  projections: ``dot_general``/``dot_general_cls`` hooks and Qwix
  (``promote_dtype``, ``jax.lax.dot_general``) reach them as in
  :class:`GatedFFN`. The experts reach them through ``impl='dense'``: each
  of ``gate_proj``, ``up_proj`` and ``down_proj`` runs one ``dot_general``
  (or the hook; ``dot_general_cls`` makes one instance per projection) over
  its whole stacked kernel, every expert on every token, as a hand-written
  MoE does, so Qwix QAT/PTQ/LoRA and AQT quantize the experts per expert and
  output channel. ``impl='auto'`` picks it by itself under a ``dot_general``
  hook or while ``jax.lax.dot_general`` is intercepted (Qwix); dropless it
  costs ``E / k`` times the experts' FLOPs of the grouped impls (with
  ``capacity_factor=c`` each expert computes its capacity slots only: about
  ``c`` times).

  With ``remat=True`` the backward pass keeps two ``(T·k, hidden)`` arrays
  (the experts' gate and up pre-activations, ``'moe_gate'``/``'moe_up'``;
  ``(E, rows, hidden)`` with ``'dense'``), the small routing results
  (``'moe_routing'``: router logits, top-k weights and experts, the sorted
  layout) and the shared expert's two. Under
  a mesh whose logical axis rules map ``'exp'`` to a mesh axis
  (:data:`EXPERT_PARALLEL_RULES`), the grouped impls run expert-parallel
  (``'dense'`` leaves the partitioning to ``jit``): tokens move to the
  experts' devices with all-to-all and no expert kernel is gathered. The
  shared options (``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
  initialisers, ``dot_general``, ``dot_general_cls``, ``remat``) are the
  attributes of the layers' base class, ``LayerBase`` (listed with this
  layer's own in the API reference); ``MoE`` has no dropout and no
  ``activations_in_float32``.

  Attributes:
    hidden_features: each expert's hidden width (``'mlp'``).
    num_experts: ``E``, the number of routed experts (``'exp'``).
    experts_per_token: ``k``, in ``[1, E]``.
    out_features: the output width; ``None`` (default) uses the input's.
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
    deterministic: the default of the call's ``deterministic``: ``True`` (no
      noise) or ``False`` (noise, with a ``'dropout'`` rng); only needed
      when ``router_jitter_noise > 0``.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, flaxact
    >>> from flaxact import linen as fl
    >>> layer = fl.MoE(64, num_experts=8, experts_per_token=2,
    ...                router='sigmoid', shared_hidden_features=64)
    >>> x = jnp.ones((4, 16), jnp.bfloat16)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> variables['batch_stats']['score_correction_bias'].shape
    (8,)
    >>> layer.apply(variables, x).dtype
    dtype(bfloat16)

  Raises:
    ValueError: for ``experts_per_token`` outside ``[1, num_experts]``, an
      unknown router or impl, a grouped impl with a ``dot_general`` hook,
      groups not dividing the experts,
      ``capacity_factor <= 0``, ``router_jitter_noise`` outside ``[0, 1)``,
      or (at the call) an input of another width than the layer was
      initialised with or a ``token_mask`` of another shape.
    TypeError: for integer input, a ``token_mask`` that is not bool or a
      learnable activation module.

  References:
    Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
    Mixture-of-Experts Layer", 2017; Jiang et al., "Mixtral of Experts",
    2024; DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024.
  """

  hidden_features: int
  num_experts: int
  experts_per_token: int
  _: dataclasses.KW_ONLY
  out_features: int | None = None
  activation: str | Callable[..., Any] = 'silu'
  gated_product: Callable[[Array, Array], Array] | None = None
  router: Router | str = 'softmax'
  normalize_weights: bool = True
  routed_scaling_factor: float = 1.0
  num_groups: int | None = None
  groups_per_token: int | None = None
  router_use_bias: bool = False
  shared_hidden_features: int | None = None
  shared_expert_gate: bool = False
  capacity_factor: float | None = None
  ep_capacity_factor: float | None = None
  impl: Impl | str = 'auto'
  tile_size: int | None = None
  router_jitter_noise: float = 0.0
  deterministic: bool | None = None

  input_projections: ClassVar[tuple[str, ...]] = ('router',)
  remat_names: ClassVar[tuple[str, ...]] = remat.MOE_NAMES

  def __post_init__(self):
    name = type(self).__name__
    moe_body.check_options(
      name,
      self.routing,
      num_experts=self.num_experts,
      hidden_features=self.hidden_features,
      activation=self.activation,
      gated_product=self.gated_product,
      shared_hidden_features=self.shared_hidden_features,
      shared_expert_gate=self.shared_expert_gate,
      module_type=nn.Module,
      hooked=self.hooked,
    )
    if self.out_features is not None:
      checks.check_positive_int(self.out_features, 'out_features', name)
    check_jitter(self.router_jitter_noise, name)
    super().__post_init__()

  @property
  def routing(self) -> RoutingSettings:
    """The routing options, router and impl names normalised.

    Raises:
      ValueError: for an unknown router or impl.
    """
    return RoutingSettings(
      experts_per_token=self.experts_per_token,
      router=self.router,
      normalize_weights=self.normalize_weights,
      routed_scaling_factor=self.routed_scaling_factor,
      num_groups=self.num_groups,
      groups_per_token=self.groups_per_token,
      capacity_factor=self.capacity_factor,
      ep_capacity_factor=self.ep_capacity_factor,
      impl=self.impl,
      tile_size=self.tile_size,
    ).normalised()

  def __call__(
    self,
    x: Array,
    deterministic: bool | None = None,
    *,
    token_mask: Array | None = None,
  ) -> Array:
    """Applies the layer and records its auxiliary outputs.

    Args:
      x: input of shape ``(..., in_features)``, floating dtype.
      deterministic: ``False`` applies the router jitter noise (with a
        ``'dropout'`` rng); ``None`` uses the attribute. Changes nothing
        when ``router_jitter_noise == 0`` (accepted for a drop-in swap with
        the dense FFNs).
      token_mask: ``x.shape[:-1]`` bool, ``True`` for a real token;
        masked tokens get no routed output and count in no statistic.
        ``None``: every token is real.

    Returns:
      An array of shape ``(..., out_features)`` in ``dtype`` (by default the
      input's dtype).

    Raises:
      TypeError: if ``x`` is not floating point or ``token_mask`` not bool.
      ValueError: if the last axis of ``x`` is not the width the layer was
        initialised with, ``token_mask`` has another shape than
        ``x.shape[:-1]``, or for jitter noise without ``deterministic`` or,
        in training, without a ``'dropout'`` rng.
    """
    x = self.check_input(x)
    mask = check_token_mask(token_mask, x.shape[:-1], type(self).__name__)
    key = jitter_key(self, deterministic)
    with tracing.seen(x, self.variables):  # what remat would hide
      out = self.run(MoE._forward, x, key, mask)
    y, aux = cast(tuple[Array, moe_body.Aux], out)
    for name, value in aux.recorded().items():
      self.sow('intermediates', name, value)
    return y

  def _experts(self, d: int, out: int) -> list[experts.ExpertProjection]:
    parts = (
      ('gate_proj', d, self.hidden_features, sharding.EXPERT_IN_PROJ_AXES),
      ('up_proj', d, self.hidden_features, sharding.EXPERT_IN_PROJ_AXES),
      ('down_proj', self.hidden_features, out, sharding.EXPERT_OUT_PROJ_AXES),
    )
    return [
      experts.ExpertProjection(
        num_experts=self.num_experts,
        in_features=n_in,
        features=n_out,
        axes=axes,
        options=self.projection_options,
        name=name,
      )
      for name, n_in, n_out, axes in parts
    ]

  @nn.compact
  def _forward(
    self, x: Array, key: Array | None, mask: Array | None
  ) -> tuple[Array, Any]:
    dtype = projection.layer_dtype(x, self.dtype)
    out = self.out_features or x.shape[-1]
    routing = self.routing
    logits = self.projection(
      'router',
      (self.num_experts,),
      sharding.ROUTER_PROJ_AXES,
      jnp.promote_types(x.dtype, jnp.float32),
      use_bias=self.router_use_bias,
    )(x if key is None else jitter(x, key, self.router_jitter_noise))
    bias = None
    if routing.router == 'sigmoid':
      bias = self.variable(
        STATS,
        'score_correction_bias',
        jnp.zeros,
        (self.num_experts,),
        jnp.float32,
      ).value
    xc = x.astype(dtype)
    y, aux = moe_body.routed(
      xc,
      logits,
      self._experts(x.shape[-1], out),
      routing=routing,
      product=expert_product(self.activation, self.gated_product),
      score_correction_bias=bias,
      precision=self.precision,
      hooked=self.hooked,
      token_mask=mask,
    )
    if self.shared_hidden_features is not None:
      y = moe_body.add_shared(y, *self._shared(xc, out, dtype))
    return y, aux

  def _shared(self, x: Array, out: int, dtype: Dtype):
    shared = GatedFFN(
      cast(int, self.shared_hidden_features),
      out,
      activation=self.activation,
      dtype=dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      dot_general=self.dot_general,
      dot_general_cls=self.dot_general_cls,
      remat=False,
      name='shared_expert',
    )(x)
    gate = None
    if self.shared_expert_gate:
      gate = self.projection(
        'shared_expert_gate',
        (1,),
        sharding.ROUTER_PROJ_AXES,
        dtype,
        use_bias=False,
      )(x)
    return shared, gate

  def repr_fields(self) -> list[dataclasses.Field]:
    """The constructor arguments, the shared layer options last."""
    base = {f.name for f in dataclasses.fields(LayerBase)}
    return sorted(super().repr_fields(), key=lambda f: f.name in base)
