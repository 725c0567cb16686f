"""The reference GPT: decoder-only, RMSNorm, RoPE, SwiGLU, grouped-query attention.

One module and one forward that runs under any ``(tp, cp)`` context. Its parameters are
the weights it computes with, in one of two forms:

* **full** (``weights_tp == 1``, the default: a single-process model, tests, the
  reference): the forward takes views (``Tensor.narrow``) of this rank's tensor-parallel
  shard, so gradients land in the full-shape ``.grad`` (zero outside the shard);
* **one tp shard** (``weights_tp == tp``): what the :class:`~.engine.Engine` installs each
  step — the compute weights gathered from the sharded master state
  (:mod:`~.state`), already cut for this rank's tp coordinate (bf16 under autocast).

Tensor parallelism (column → row, Megatron-style):

* attention: ``wq``/``wk``/``wv`` split by heads (output rows), ``wo`` split by input
  columns; ``copy_to_tp`` before, ``reduce_from_tp`` after;
* MLP: ``w_gate``/``w_up`` split by output rows, ``w_down`` by input columns;
* embedding and LM head: split by vocabulary rows (dim 0, :data:`VOCAB`) over the tp
  ranks, uneven chunks allowed (:func:`~.parallel.tp_range`); the embedding sums the
  owners' rows, the head computes this rank's logits (T, V/tp) and the cross-entropy is
  vocabulary-parallel (:mod:`~.vocab`), so no rank holds full-vocabulary logits and the
  head's weights, FLOPs and logits are divided by tp (what the planner's analytic model
  prices with ``vocab_parallel=True``). The embedding is a lookup, so splitting it saves
  only memory (``V·h·(1 − 1/tp)`` weights per rank, which that model also divides by tp)
  for one all-reduce of (T, hidden) per micro-batch;
* the norms are **replicated** on every tp rank.

Context parallelism: the rank holds its head+tail chunks of every sequence; keys and
values are all-gathered inside the cp group after RoPE (:func:`gather_from_cp`).

Pipeline parallelism: the forward is three public parts — :meth:`GPT.embed_tokens`,
:meth:`GPT.run_layers` over a range of blocks, :meth:`GPT.head_loss` — and a pipeline
stage (:mod:`~.pipeline`) runs only its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from strategies.kernels import causal_attention

from .batch import IGNORE_INDEX, LocalBatch
from .parallel import (
    SINGLE_DEVICE,
    ParallelContext,
    copy_to_tp,
    gather_from_cp,
    gather_from_tp,
    reduce_from_tp,
    tp_range,
)
from .vocab import vocab_parallel_cross_entropy, vocab_parallel_embedding

__all__ = ["ModelConfig", "GPT", "COLUMN", "ROW", "VOCAB", "init_parameter"]

COLUMN = 0
"""Tensor-parallel split along dim 0 (output rows): ``wq, wk, wv, w_gate, w_up``."""
ROW = 1
"""Tensor-parallel split along dim 1 (input columns): ``wo, w_down``."""
VOCAB = 0
"""Tensor-parallel split along dim 0 (vocabulary rows, possibly uneven): ``embed, lm_head``."""


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the reference GPT."""

    vocab_size: int
    """Token ids are ``0 .. vocab_size-1``."""
    hidden_size: int
    """Residual width (model dimension)."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Query heads; ``hidden_size`` must be a multiple."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention); must divide ``num_heads``."""
    ffn_hidden_size: int
    """SwiGLU inner width."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every matrix."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig: {name}={v!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (GQA groups)"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"ModelConfig: head size {self.hidden_size // self.num_heads} must be even for RoPE")
        if not self.rope_theta > 0 or not self.norm_eps > 0 or not self.init_std > 0:
            raise ValueError("ModelConfig: rope_theta, norm_eps and init_std must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_tp(self, tp: int) -> None:
        """Raise ``ValueError`` unless heads, kv heads and the MLP split evenly over ``tp`` ranks
        and every rank gets at least one vocabulary row (an uneven vocabulary is fine)."""
        if self.vocab_size < tp:
            raise ValueError(
                f"tensor-parallel degree tp={tp} exceeds vocab_size={self.vocab_size}: every tp rank holds "
                f"at least one vocabulary row of the embedding and LM head; drop layouts with tp={tp}"
            )
        for name, n in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                        ("ffn_hidden_size", self.ffn_hidden_size)):
            if n % tp:
                raise ValueError(
                    f"tensor-parallel degree tp={tp} does not divide {name}={n}; drop layouts with tp={tp} "
                    f"from the candidates or choose a model whose {name} is a multiple of {tp}"
                )


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.wq = nn.Parameter(torch.empty(cfg.num_heads * d, h))
        self.wk = nn.Parameter(torch.empty(cfg.num_kv_heads * d, h))
        self.wv = nn.Parameter(torch.empty(cfg.num_kv_heads * d, h))
        self.wo = nn.Parameter(torch.empty(h, cfg.num_heads * d))
        self.mlp_norm = nn.Parameter(torch.ones(h))
        self.w_gate = nn.Parameter(torch.empty(cfg.ffn_hidden_size, h))
        self.w_up = nn.Parameter(torch.empty(cfg.ffn_hidden_size, h))
        self.w_down = nn.Parameter(torch.empty(h, cfg.ffn_hidden_size))


_VOCAB_SPLITS = {"embed": VOCAB, "lm_head": VOCAB}
_SPLITS = {"wq": COLUMN, "wk": COLUMN, "wv": COLUMN, "wo": ROW, "w_gate": COLUMN, "w_up": COLUMN, "w_down": ROW}


def init_parameter(name: str, tensor: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """Initialise parameter ``name`` in place: norm weights 1, every matrix Normal(0, ``std``)."""
    with torch.no_grad():
        if name.endswith("norm"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, std, generator=generator)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)``, the statistics in fp32 (torch's fused kernel where it has one)."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` (T, head_dim) for true positions (restarting per sequence), fp32."""
    even = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (even / head_dim))  # (head_dim/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, heads, head_dim) by the half-split convention (first half ↔ second half).

    The tables are cast to ``x``'s dtype first (as Hugging Face Llama does), so a bf16
    ``x`` is rotated in bf16 and never materialised in fp32.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype)[:, None, :] + rotated * sin.to(x.dtype)[:, None, :]


class GPT(nn.Module):
    """Strategy-independent master parameters plus a forward under any (tp, cp) context."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.attention_kernel = "auto"
        """Attention kernel name (see :func:`strategies.kernels.choose_kernel`); the engine sets it."""
        self.weights_tp = 1
        """Tensor-parallel degree the parameters are cut for: 1 = full tensors."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, unit norm weights (uses the current torch RNG)."""
        for name, p in self.named_parameters():
            init_parameter(name, p, self.config.init_std)

    def tp_split_dims(self) -> dict[str, int | None]:
        """Per parameter name: the dim split over tensor-parallel ranks (``None`` = replicated)."""
        out: dict[str, int | None] = {}
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            out[name] = _SPLITS.get(leaf) if name.startswith("layers.") else _VOCAB_SPLITS.get(name)
        return out

    # -- forward -------------------------------------------------------------------------
    # The forward in three parts, so a pipeline stage (:mod:`~.pipeline`) runs only its own:
    # embed_tokens (first stage) → run_layers (its blocks) → head_loss (last stage).
    def embed_tokens(self, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        """Token embeddings (T_local, hidden) of this rank's rows: the residual stream's start."""
        weight = self._shard(self.embed, VOCAB, pc)
        return vocab_parallel_embedding(batch.input_ids, weight, pc, self.config.vocab_size)

    def run_layers(self, x: torch.Tensor, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE,
                   layers: range | None = None) -> torch.Tensor:
        """The residual stream (T_local, hidden) after transformer blocks ``layers`` (default: all)."""
        cfg = self.config
        cos, sin = rope_tables(batch.position_ids, cfg.head_dim, cfg.rope_theta)
        for i in range(cfg.num_layers) if layers is None else layers:
            layer = self.layers[i]
            x = x + self._attention(layer, rms_norm(x, layer.attn_norm, cfg.norm_eps), cos, sin, batch, pc)
            x = x + self._mlp(layer, rms_norm(x, layer.mlp_norm, cfg.norm_eps), pc)
        return x

    def head_loss(self, x: torch.Tensor, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        """Final norm, LM head and the summed next-token cross-entropy (nats, fp32 scalar) of ``x``:
        this rank's vocabulary chunk of the logits (T_local, V/tp) in fp32, the loss vocabulary-parallel."""
        x = copy_to_tp(rms_norm(x, self.final_norm, self.config.norm_eps), pc)
        logits = F.linear(x, self._shard(self.lm_head, VOCAB, pc)).float()  # (T, V/tp)
        return vocab_parallel_cross_entropy(logits, batch.targets, pc, self.config.vocab_size, IGNORE_INDEX)

    def hidden_states(self, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        """Final-norm hidden states (T_local, hidden) of this rank's rows."""
        x = self.run_layers(self.embed_tokens(batch, pc), batch, pc)
        return rms_norm(x, self.final_norm, self.config.norm_eps)

    def logits(self, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        """Full-vocabulary logits (T_local, vocab), on every tp rank (the shards gathered under tp > 1)."""
        x = copy_to_tp(self.hidden_states(batch, pc), pc)
        return gather_from_tp(F.linear(x, self._shard(self.lm_head, VOCAB, pc)), pc, self.config.vocab_size)

    def forward(self, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        """Sum of next-token cross-entropies (nats) over this rank's loss tokens, fp32 scalar."""
        return self.head_loss(self.run_layers(self.embed_tokens(batch, pc), batch, pc), batch, pc)

    # -- blocks ----------------------------------------------------------------------------
    def _shard(self, w: torch.Tensor, dim: int, pc: ParallelContext) -> torch.Tensor:
        """This rank's tp shard of weight ``w``: ``w`` itself when it already is one."""
        if self.weights_tp == pc.tp_size:
            return w
        if self.weights_tp != 1:
            raise ValueError(
                f"the model holds weights cut for tp={self.weights_tp} but runs under tp={pc.tp_size}; "
                "install the compute weights of the step's strategy first (Engine does)"
            )
        start, size = tp_range(w.shape[dim], pc.tp_size, pc.tp_rank)
        return w.narrow(dim, start, size)

    def _attention(self, layer: _Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: LocalBatch, pc: ParallelContext) -> torch.Tensor:
        cfg = self.config
        t, d = x.shape[0], cfg.head_dim
        hq, hkv = cfg.num_heads // pc.tp_size, cfg.num_kv_heads // pc.tp_size
        x = copy_to_tp(x, pc)
        q = F.linear(x, self._shard(layer.wq, COLUMN, pc)).view(t, hq, d)  # (T, hq/tp, d)
        k = F.linear(x, self._shard(layer.wk, COLUMN, pc)).view(t, hkv, d)  # (T, hkv/tp, d)
        v = F.linear(x, self._shard(layer.wv, COLUMN, pc)).view(t, hkv, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pc.cp_size > 1:
            kv = gather_from_cp(torch.cat([k, v], dim=-1), pc, batch.cp_counts,
                                batch.cp_full_from_gathered, batch.cp_own_rows)  # (T_row, hkv/tp, 2d)
            k, v = kv[..., :d], kv[..., d:]
        o = causal_attention(q, k, v, batch.segments, self.attention_kernel).reshape(t, hq * d)  # (T, hq/tp · d)
        return reduce_from_tp(F.linear(o, self._shard(layer.wo, ROW, pc)), pc)

    def _mlp(self, layer: _Block, x: torch.Tensor, pc: ParallelContext) -> torch.Tensor:
        x = copy_to_tp(x, pc)
        gate = F.linear(x, self._shard(layer.w_gate, COLUMN, pc))
        up = F.linear(x, self._shard(layer.w_up, COLUMN, pc))
        return reduce_from_tp(F.linear(F.silu(gate) * up, self._shard(layer.w_down, ROW, pc)), pc)
