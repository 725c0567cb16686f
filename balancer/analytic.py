"""Analytic cost and memory model: coefficients ``a, b, c`` and a token capacity per layout.

From a :class:`~balancer.specs.ModelSpec`, a :class:`~balancer.specs.HardwareSpec` and the
training choices of :class:`~balancer.analytic_options.AnalyticOptions`,
for every ``Layout(tp, cp, pp)`` (formulas, sources and a worked example in
``docs/cost_model.md``):

* **compute** — matmul FLOPs of one sequence of ``s`` tokens on the busiest pipeline
  stage, forward ×3 for forward + backward (×4 with full recomputation), split over the
  ``tp·cp`` ranks of the stage, at ``peak · mfu · efficiency``: the matmuls (linear term)
  at ``tp_efficiency(tp) · cp_efficiency(cp)`` — tables fitted to the Hydraulis 13B
  profile — and causal attention (the ``s²`` term) at ``cp_efficiency(cp)``.
* **communication** (added to ``b``, never overlapped) — tensor-parallel all-reduces,
  context-parallel K/V all-gathers and dK/dV reduce-scatters, pipeline sends.
* **overhead** ``c`` — a fixed time per layer per micro-batch from the hardware spec, and
  ``d`` — a fixed time per layer per sequence (``sequence_overhead_seconds``).
* **memory** — weights, gradients and Adam states of the stage's shard (optionally ZeRO
  sharded, or in the bundled runtime's layout: ``zero_stage="world"``), activations per token (FlashAttention: no ``s²`` term) times the micro-batches
  1F1B keeps in flight, and a reserve; the capacity is what fits in what is left.

Units: FLOPs, seconds, bytes, tokens. The per-sequence time ``t(s) = a·s² + b·s + d`` is one
micro-batch's time *per pipeline stage*, as the replica formula ``Σ T + v·c + (pp−1)·max T``
expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from strategies.layout import Layout

from .analytic_options import AnalyticOptions
from .layout_cost import LayoutCost, UnsupportedLayoutError
from .specs import HardwareSpec, ModelSpec

__all__ = [
    "ForwardFlops",
    "LayoutAnalysis",
    "AnalyticModel",
    "forward_flops",
]

SOFTMAX_STATS_BYTES = 4
"""FlashAttention keeps one fp32 log-sum-exp per query head per token for its backward."""
LOSS_BYTES = 4
"""The cross-entropy works on an fp32 copy of the logits (kept for its backward)."""


@dataclass(frozen=True, slots=True)
class ForwardFlops:
    """Forward FLOPs of one sequence of ``s`` tokens on the whole (unsplit) model.

    One layer: ``attention_quadratic·s² + layer_linear·s``; the LM head: ``head_linear·s``.
    A multiply-add counts 2 FLOPs; norms, rotary embeddings, softmax and other
    element-wise work are not counted (they hide in ``mfu``).
    """

    attention_quadratic: float
    """Per layer, FLOPs per token²: causal ``QKᵀ`` and ``AV`` over ``s(s+1)/2`` pairs → ``2·n_q·d``."""
    layer_linear: float
    """Per layer, FLOPs per token: Q/K/V/output projections, MLP, causal diagonal."""
    head_linear: float
    """LM head, FLOPs per token: ``2·h·V``."""

    def layer(self, s: float) -> float:
        return self.attention_quadratic * s * s + self.layer_linear * s

    def total(self, s: float, num_layers: int) -> float:
        """Forward FLOPs of the whole model on one sequence of ``s`` tokens."""
        return num_layers * self.layer(s) + self.head_linear * s


def forward_flops(model: ModelSpec, tp: int = 1, vocab_parallel: bool = True) -> ForwardFlops:
    """Forward FLOP coefficients of ``model``, per rank of a ``tp``-way tensor-parallel split.

    Query heads, MLP columns and (with ``vocab_parallel``) the vocabulary split over ``tp``;
    key/value heads too when ``tp`` divides them, else each rank computes (replicates) one KV head.
    """
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    q = model.q_size / tp  # query width on this rank
    kv = _kv_heads_per_rank(model, tp) * d  # key (or value) width on this rank
    projections = 2 * h * (q + 2 * kv) + 2 * q * h  # Q, K, V in; output projection out
    mlp = 2 * model.mlp_matrices * h * f / tp
    causal_diagonal = 2 * q  # s(s+1)/2 pairs = s²/2 + s/2, for QKᵀ and AV, 2 FLOPs each
    return ForwardFlops(
        attention_quadratic=2 * q,
        layer_linear=projections + mlp + causal_diagonal,
        head_linear=2 * h * model.vocab_size / (tp if vocab_parallel else 1),
    )


def _kv_heads_per_rank(model: ModelSpec, tp: int) -> int:
    assert model.num_kv_heads is not None
    if model.num_kv_heads % tp == 0:
        return model.num_kv_heads // tp
    return 1  # tp is a multiple of num_kv_heads (checked by the caller): KV heads replicated


@dataclass(frozen=True, kw_only=True, slots=True)
class LayoutAnalysis:
    """Everything the analytic model derives for one layout (per rank of the busiest stage)."""

    layout: Layout
    layers_per_stage: int
    efficiency: float
    """Factor on ``peak · mfu`` of the matmuls (linear term), :meth:`AnalyticOptions.efficiency`."""
    attention_efficiency: float
    """Factor on ``peak · mfu`` of causal attention (``a``), :meth:`AnalyticOptions.attention_efficiency`."""
    flops_quadratic: float
    """Forward + backward (+ recompute) FLOPs per token² on one rank of the busiest stage."""
    flops_linear: float
    """Same, FLOPs per token."""
    a: float
    """Seconds per token² (attention)."""
    b_compute: float
    """Seconds per token of matmuls."""
    b_tp: float
    """Seconds per token of tensor-parallel all-reduces."""
    b_cp: float
    """Seconds per token of context-parallel K/V all-gathers and dK/dV reduce-scatters."""
    b_pp: float
    """Seconds per token of pipeline activation/gradient sends."""
    c: float
    """Fixed seconds per micro-batch."""
    d: float
    """Fixed seconds per sequence of a micro-batch."""
    static_bytes: float
    """Weights + gradients + optimizer states (+ ZeRO-3 gather buffers) on the fullest stage."""
    activation_bytes_per_token: float
    """Activation bytes per token of one micro-batch on the binding stage (in-flight copies included)."""
    available_bytes: float
    """Device memory minus the reserve."""
    token_capacity: int
    """``floor((available − static) / activation_bytes_per_token)`` on the binding stage (may be <= 0)."""

    @property
    def b(self) -> float:
        return self.b_compute + self.b_tp + self.b_cp + self.b_pp

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layout"] = self.layout.name
        out["b"] = self.b
        return out


class AnalyticModel:
    """Prices layouts of one model on one hardware type; ``layout_cost`` is the resolver
    :meth:`balancer.cost.CostModel.analytic` caches."""

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, options: AnalyticOptions | None = None) -> None:
        if not isinstance(model, ModelSpec):
            raise ValueError(f"AnalyticModel: model must be a ModelSpec, got {type(model).__name__}")
        if not isinstance(hardware, HardwareSpec):
            raise ValueError(f"AnalyticModel: hardware must be a HardwareSpec, got {type(hardware).__name__}")
        self.model = model
        self.hardware = hardware
        self.options = options or AnalyticOptions()

    # -- validity -------------------------------------------------------------------------------
    def check(self, layout: Layout) -> None:
        """Raise :class:`UnsupportedLayoutError` (a ``ValueError``) if ``layout`` cannot run this model."""
        m, lay = self.model, layout
        if m.num_heads % lay.tp:
            raise UnsupportedLayoutError(
                f"layout {lay.name}: tp={lay.tp} does not divide num_heads={m.num_heads} of {m.name}; "
                f"use a tp that divides {m.num_heads}"
            )
        assert m.num_kv_heads is not None
        if m.num_kv_heads % lay.tp and lay.tp % m.num_kv_heads:
            raise UnsupportedLayoutError(
                f"layout {lay.name}: tp={lay.tp} neither divides nor is a multiple of num_kv_heads="
                f"{m.num_kv_heads} of {m.name}; use a tp that divides {m.num_kv_heads} or a multiple of it"
            )
        if lay.pp > m.num_layers:
            raise UnsupportedLayoutError(
                f"layout {lay.name}: pp={lay.pp} exceeds num_layers={m.num_layers} of {m.name}; "
                f"use pp <= {m.num_layers}"
            )
        n = self.options.num_ranks
        if n is not None and lay.size > n:
            raise UnsupportedLayoutError(
                f"layout {lay.name} needs {lay.size} ranks but the job has num_ranks={n}; "
                "use smaller degrees or more ranks"
            )

    # -- the model ------------------------------------------------------------------------------
    def analyze(self, layout: Layout) -> LayoutAnalysis:
        """Time and memory breakdown of ``layout`` (capacity may come out <= 0: see :meth:`layout_cost`)."""
        self.check(layout)
        m, hw, opt = self.model, self.hardware, self.options
        tp, cp, pp = layout.tp, layout.cp, layout.pp
        recompute_full = m.activation_recompute == "full"
        layers = math.ceil(m.num_layers / pp)  # busiest stage; the head's stage gets an even share too

        # compute: forward ×3 (backward = 2× forward), ×4 when full recompute reruns the forward
        fwd = forward_flops(m, tp, self.options.vocab_parallel)
        layer_passes = 4 if recompute_full else 3
        quad = layer_passes * layers * fwd.attention_quadratic / cp
        lin = (layer_passes * layers * fwd.layer_linear + 3 * fwd.head_linear) / cp
        eff = opt.efficiency(tp, cp)
        eff_attention = opt.attention_efficiency(tp, cp)
        a = quad / (hw.effective_flops * eff_attention)
        b_compute = lin / (hw.effective_flops * eff)

        # communication per token on one rank (ring collectives, nothing overlapped)
        B = m.dtype_bytes
        b_tp = 0.0
        if tp > 1:
            # Megatron: 2 all-reduces of the (s/cp)·h activations per layer forward, 2 backward,
            # +2 when full recompute reruns the forward; ring cost 2(tp−1)/tp · bytes / bandwidth.
            n_allreduce = (6 if recompute_full else 4) * layers
            b_tp = n_allreduce * 2 * (tp - 1) / tp * m.hidden_size * B / cp / self._bandwidth(tp)
        b_cp = 0.0
        if cp > 1:
            # per layer: all-gather K and V forward; all-gather again + reduce-scatter dK, dV
            # backward (+1 all-gather for full recompute); ring cost (cp−1)/cp · full bytes.
            n_collective = (4 if recompute_full else 3) * layers
            kv_bytes = 2 * _kv_heads_per_rank(m, tp) * m.head_dim * B  # K and V, per token
            b_cp = n_collective * (cp - 1) / cp * kv_bytes / self._bandwidth(tp * cp)
        b_pp = 0.0
        if pp > 1:
            # activations forward and their gradients backward across each stage boundary,
            # already split over the tp ranks (sequence parallel) and cp ranks
            b_pp = 2 * m.hidden_size * B / (tp * cp) / self._bandwidth(layout.size)
        c = layers * hw.layer_overhead_seconds * (4 / 3 if recompute_full else 1.0)
        d = layers * hw.sequence_overhead_seconds * (4 / 3 if recompute_full else 1.0)

        static, per_token, available = self._memory(layout, layers)
        capacity = min(math.floor((available - s) / t) for s, t in zip(static, per_token))
        binding = min(range(len(static)), key=lambda k: (available - static[k]) / per_token[k])
        return LayoutAnalysis(
            layout=layout, layers_per_stage=layers, efficiency=eff, attention_efficiency=eff_attention,
            flops_quadratic=quad, flops_linear=lin, a=a, b_compute=b_compute,
            b_tp=b_tp, b_cp=b_cp, b_pp=b_pp, c=c, d=d,
            static_bytes=static[binding], activation_bytes_per_token=per_token[binding],
            available_bytes=available, token_capacity=int(capacity),
        )

    def layout_cost(self, layout: Layout) -> LayoutCost:
        """:class:`LayoutCost` of ``layout``; raises :class:`UnsupportedLayoutError` when not
        even one token fits next to the weights and optimizer states."""
        an = self.analyze(layout)
        if an.token_capacity < 1:
            gib = 1024**3
            raise UnsupportedLayoutError(
                f"layout {layout.name} cannot hold {self.model.name} on {self.hardware.name}: needs "
                f"{an.static_bytes / gib:.1f} GiB of weights, gradients and optimizer states plus "
                f"{an.activation_bytes_per_token / 2**20:.2f} MiB per token, but only "
                f"{an.available_bytes / gib:.1f} GiB is available per rank; raise tp or pp, "
                "shard states with zero_stage=1..3 or 'world' (and num_ranks), or use activation_recompute='full'"
            )
        return LayoutCost(a=an.a, b=an.b, c=an.c, d=an.d, token_capacity=an.token_capacity)

    def tokens_per_second(self, layout: Layout, length: int) -> float:
        """Training throughput per device with one sequence of ``length`` tokens per micro-batch
        (steady-state pipeline: each stage finishes one micro-batch every ``t(s) + c``, ``d`` in ``t``)."""
        cost = self.layout_cost(layout)
        step = float(cost.seconds(length)) + cost.c
        return length / step / layout.size

    def model_flops_utilization(self, layout: Layout, length: int) -> float:
        """MFU in the usual sense: model FLOPs (forward ×3, no recompute) of one sequence of
        ``length`` tokens over the time the layout takes, as a fraction of peak per device."""
        fwd = forward_flops(self.model)
        model_flops = 3 * fwd.total(length, self.model.num_layers)
        return model_flops * self.tokens_per_second(layout, length) / length / self.hardware.peak_flops

    # -- helpers --------------------------------------------------------------------------------
    def _bandwidth(self, group_span: int) -> float:
        """Intra-node bandwidth when a group of consecutive ranks spanning ``group_span`` fits in a node."""
        hw = self.hardware
        return hw.intra_node_bandwidth if group_span <= hw.ranks_per_node else hw.inter_node_bandwidth

    def _memory(self, layout: Layout, layers: int) -> tuple[list[float], list[float], float]:
        """Static bytes and activation bytes per token of the first and the last stage, and the
        bytes available per rank. Middle stages hold fewer parameters than the first and fewer
        in-flight micro-batches, so the first and last bound the capacity."""
        m, hw, opt = self.model, self.hardware, self.options
        tp, cp, pp = layout.tp, layout.cp, layout.pp
        h, d, B = m.hidden_size, m.head_dim, m.dtype_bytes
        kv_rank = _kv_heads_per_rank(m, tp) * d
        q_rank = m.q_size / tp
        f_rank = m.ffn_hidden_size / tp

        # parameters on one rank
        layer_params = h * (q_rank + 2 * kv_rank) + q_rank * h + m.mlp_matrices * h * f_rank + 2 * h
        vocab_tp = tp if opt.vocab_parallel else 1
        vocab_params = m.vocab_size * h / vocab_tp  # (vocab-parallel) embedding or LM head
        if pp == 1:
            heads = 1 if m.tie_embeddings else 2
            stage_params = [layers * layer_params + heads * vocab_params + h]
        else:
            # tied embeddings keep a copy on the first and on the last stage (Megatron)
            stage_params = [layers * layer_params + vocab_params, layers * layer_params + vocab_params + h]
        static = [self._state_bytes(p, layout, layer_params) for p in stage_params]

        # activation bytes per token per layer kept for the backward (sequence parallel: all /tp)
        mlp_saved = {"none": m.mlp_matrices, "selective": m.mlp_matrices - 1, "full": m.mlp_matrices}
        full_layer = (
            B * (4 * h / tp + q_rank + 2 * kv_rank + q_rank + mlp_saved[m.activation_recompute] * f_rank)
            + SOFTMAX_STATS_BYTES * m.num_heads / tp
        ) / cp  # 2 norm inputs + 2 norm outputs (QKV and MLP inputs), Q K V, attention output, MLP
        if m.activation_recompute == "full":
            stored, transient = B * h / tp / cp, full_layer  # layer input; one layer rebuilt at a time
        else:
            stored, transient = full_layer, 0.0
        head = (B * h / tp + m.vocab_size / vocab_tp * (B + LOSS_BYTES)) / cp  # final norm input, logits
        # 1F1B: stage k holds pp − k micro-batches' activations; the first stage holds pp
        first = pp * layers * stored + transient + (head if pp == 1 else 0.0)
        per_token = [first] if pp == 1 else [first, layers * stored + transient + head]

        reserve = opt.reserve_bytes if opt.reserve_bytes is not None else 0.1 * hw.memory_bytes
        return static, per_token, hw.memory_bytes - reserve

    def _state_bytes(self, params: float, layout: Layout, layer_params: float) -> float:
        """Weights + gradients + optimizer states of ``params`` parameters under the ZeRO stage."""
        m, opt = self.model, self.options
        w = m.dtype_bytes
        o = opt.optimizer_bytes
        if opt.zero_stage == "world":
            assert opt.num_ranks is not None
            g = opt.grad_bytes if opt.grad_bytes is not None else 4
            return m.num_parameters * (o + g) / opt.num_ranks + params * (w + g)  # owned chunks + compute shard
        g = opt.grad_bytes if opt.grad_bytes is not None else m.dtype_bytes
        if opt.zero_stage == 0:
            return params * (w + g + o)
        assert opt.num_ranks is not None
        shards = max(1, opt.num_ranks // (layout.tp * layout.pp))  # dp × cp peers of this shard
        if opt.zero_stage == 1:
            return params * (w + g) + params * o / shards
        if opt.zero_stage == 2:
            return params * w + params * (g + o) / shards
        return params * (w + g + o) / shards + 2 * layer_params * w  # + current and prefetched layer

    def meta(self) -> dict[str, Any]:
        """What :meth:`balancer.cost.CostModel.from_dict` needs to rebuild this model."""
        return {
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "options": self.options.to_dict(),
            "time_unit": "s",
        }
