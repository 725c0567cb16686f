"""Model and hardware descriptions for the analytic cost model, with named presets.

:class:`ModelSpec` is the shape of a decoder-only Transformer (Llama-style: RMSNorm,
rotary positions, grouped-query attention, SwiGLU MLP); :class:`HardwareSpec` is one
accelerator and its interconnect. Both are plain validated dataclasses with
``to_dict`` / ``from_dict`` so the CLI can load them from YAML or TOML files.

>>> model_preset("llama-7b").num_parameters      # 6.74e9
6738415616
>>> hardware_preset("h100-80g").peak_flops       # dense bf16 FLOP/s
989000000000000.0

Registries are explicit dicts (:data:`MODEL_PRESETS`, :data:`HARDWARE_PRESETS`); the
lookup functions accept any capitalisation and name the valid choices on a miss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = [
    "RECOMPUTE_MODES",
    "ModelSpec",
    "HardwareSpec",
    "MODEL_PRESETS",
    "HARDWARE_PRESETS",
    "model_preset",
    "hardware_preset",
]

GIB = 1024**3

RECOMPUTE_MODES = ("none", "selective", "full")
"""Activation recomputation: ``none`` keeps every activation the backward needs;
``selective`` recomputes the cheap element-wise parts (the MLP activation function; the
attention scores are never stored with FlashAttention); ``full`` keeps only each layer's
input and reruns the layer's forward during the backward (Korthikanti et al. 2022)."""


def _positive_int(owner: str, name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive integer ({hint})")
    return value


def _positive_float(owner: str, name: str, value: Any, hint: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name}={value!r} must be a finite number {bound} ({hint})")
    return float(value)


def _from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    return cls(**dict(d))


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """Shape of a decoder-only Transformer (counts, not bytes; sizes in elements)."""

    name: str = "custom"
    """Label used in reports and error messages."""
    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """Model width ``h``."""
    num_heads: int
    """Query heads; ``hidden_size`` must be a multiple (head dim ``d = h / num_heads``)."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None`` means ``num_heads`` (multi-head)."""
    ffn_hidden_size: int
    """MLP inner width ``f`` (Llama-7B: 11008)."""
    vocab_size: int
    """Vocabulary size ``V`` (embedding rows and LM-head columns)."""
    dtype_bytes: int = 2
    """Bytes per parameter and activation element in compute precision (2 for bf16/fp16)."""
    gated_mlp: bool = True
    """SwiGLU-style MLP with three matrices (gate, up, down); ``False``: two (up, down)."""
    activation_recompute: str = "none"
    """One of :data:`RECOMPUTE_MODES`."""
    tie_embeddings: bool = False
    """LM head shares the embedding matrix (one copy of ``V·h`` parameters)."""

    def __post_init__(self) -> None:
        owner = f"ModelSpec {self.name!r}"
        _positive_int(owner, "num_layers", self.num_layers, "e.g. 32 for Llama-7B")
        _positive_int(owner, "hidden_size", self.hidden_size, "e.g. 4096")
        _positive_int(owner, "num_heads", self.num_heads, "e.g. 32")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _positive_int(owner, "num_kv_heads", self.num_kv_heads, "e.g. 8 for grouped-query attention")
        _positive_int(owner, "ffn_hidden_size", self.ffn_hidden_size, "e.g. 11008")
        _positive_int(owner, "vocab_size", self.vocab_size, "e.g. 32000")
        _positive_int(owner, "dtype_bytes", self.dtype_bytes, "2 for bf16, 4 for fp32")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                f"choose a head count that divides it (e.g. {_divisor_near(self.hidden_size, self.num_heads)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                f"each key/value head must serve a whole group of query heads "
                f"(e.g. num_kv_heads={_divisor_near(self.num_heads, self.num_kv_heads)})"
            )
        if self.activation_recompute not in RECOMPUTE_MODES:
            raise ValueError(
                f"{owner}: activation_recompute={self.activation_recompute!r} is not one of {list(RECOMPUTE_MODES)}"
            )
        for name in ("gated_mlp", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}: {name}={getattr(self, name)!r} must be true or false")

    # -- derived sizes (elements) ------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Per-head width ``d = h / num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        """Width of all query heads, ``num_heads · d`` (= ``hidden_size``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or all value) heads, ``num_kv_heads · d``."""
        assert self.num_kv_heads is not None
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of ``h × f`` in the MLP: 3 (gated) or 2."""
        return 3 if self.gated_mlp else 2

    @property
    def layer_matrix_parameters(self) -> int:
        """Parameters of one block's weight matrices (attention + MLP), no norms."""
        h = self.hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        return attention + self.mlp_matrices * h * self.ffn_hidden_size

    @property
    def layer_parameters(self) -> int:
        """Parameters of one block: matrices plus two norm weight vectors."""
        return self.layer_matrix_parameters + 2 * self.hidden_size

    @property
    def embedding_parameters(self) -> int:
        """Parameters of the input embedding, ``V · h``."""
        return self.vocab_size * self.hidden_size

    @property
    def num_parameters(self) -> int:
        """All parameters: embedding, blocks, final norm and (untied) LM head."""
        head = 0 if self.tie_embeddings else self.embedding_parameters
        return self.embedding_parameters + self.num_layers * self.layer_parameters + self.hidden_size + head

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with some fields changed (validated again)."""
        return ModelSpec(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return _from_dict(cls, d)


def _divisor_near(n: int, target: int) -> int:
    """The divisor of ``n`` closest to ``target`` (for error messages)."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - target), k))


@dataclass(frozen=True, kw_only=True, slots=True)
class HardwareSpec:
    """One accelerator type and its interconnect. FLOP/s, bytes, bytes/s, seconds."""

    name: str
    """Label, e.g. ``"H100-80G"``."""
    peak_flops: float
    """Dense peak of the compute dtype (bf16 tensor cores on GPUs), FLOP/s."""
    mfu: float
    """Fraction of ``peak_flops`` the model's matmuls reach in practice (0 < mfu <= 1)."""
    memory_bytes: int
    """Device memory per rank, bytes."""
    intra_node_bandwidth: float
    """Achievable collective bus bandwidth per device inside a node (NVLink), bytes/s."""
    inter_node_bandwidth: float
    """Achievable bandwidth per device between nodes (InfiniBand / RoCE), bytes/s."""
    ranks_per_node: int = 8
    """Devices per node; groups larger than this cross the inter-node network."""
    layer_overhead_seconds: float = 0.0
    """Fixed time per Transformer layer per micro-batch, forward + backward (kernel
    launches, collective latencies); enters the per-micro-batch overhead ``c``."""
    sequence_overhead_seconds: float = 0.0
    """Time per Transformer layer per sequence of a packed micro-batch, forward + backward
    (the attention kernel's per-sequence work and set-up); enters the per-sequence ``d``."""
    source: str = ""
    """Where the figures come from (datasheet, measurement: device, software, method)."""

    def __post_init__(self) -> None:
        owner = f"HardwareSpec {self.name!r}"
        _positive_float(owner, "peak_flops", self.peak_flops, "dense bf16 FLOP/s, e.g. 989e12 for H100 SXM")
        mfu = _positive_float(owner, "mfu", self.mfu, "achievable fraction of peak, e.g. 0.45")
        if mfu > 1:
            raise ValueError(f"{owner}: mfu={mfu} is a fraction of peak and must be <= 1 (e.g. 0.45)")
        _positive_int(owner, "memory_bytes", self.memory_bytes, "bytes per device, e.g. 80 * 1024**3")
        _positive_float(owner, "intra_node_bandwidth", self.intra_node_bandwidth, "bytes/s, e.g. 360e9")
        _positive_float(owner, "inter_node_bandwidth", self.inter_node_bandwidth, "bytes/s, e.g. 45e9")
        _positive_int(owner, "ranks_per_node", self.ranks_per_node, "devices per node, e.g. 8")
        _positive_float(
            owner, "layer_overhead_seconds", self.layer_overhead_seconds, "seconds, e.g. 1.5e-4", allow_zero=True
        )
        _positive_float(
            owner, "sequence_overhead_seconds", self.sequence_overhead_seconds, "seconds, e.g. 5e-5", allow_zero=True
        )
        if not isinstance(self.source, str):
            raise ValueError(f"{owner}: source={self.source!r} must be a string (where the figures come from)")
        for name in (
            "peak_flops", "mfu", "intra_node_bandwidth", "inter_node_bandwidth", "layer_overhead_seconds",
            "sequence_overhead_seconds",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def effective_flops(self) -> float:
        """``peak_flops · mfu``: FLOP/s the model's matmuls achieve on one device."""
        return self.peak_flops * self.mfu

    def replace(self, **changes: Any) -> "HardwareSpec":
        """A copy with some fields changed (validated again)."""
        return HardwareSpec(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HardwareSpec":
        return _from_dict(cls, d)


# -- presets ----------------------------------------------------------------------------------
# Model shapes are the published Llama-2 configurations (Touvron et al. 2023, Table 1 and
# the released config.json files); 70B uses grouped-query attention with 8 KV heads.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        # Small enough to train for real on a laptop CPU in the runtime tests; GQA (2 KV
        # heads for 4 query heads) and SwiGLU so the same code paths run as for Llama.
        name="tiny", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=384, vocab_size=512,
    ),
    "llama-7b": ModelSpec(
        name="llama-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
        ffn_hidden_size=11008, vocab_size=32000,
    ),
    "llama-13b": ModelSpec(
        name="llama-13b", num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40,
        ffn_hidden_size=13824, vocab_size=32000,
    ),
    "llama-70b": ModelSpec(
        name="llama-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
        ffn_hidden_size=28672, vocab_size=32000,
    ),
}
"""Named model shapes: ``tiny`` (CPU tests), ``llama-7b``, ``llama-13b``, ``llama-70b``."""

# Peak FLOP/s are the vendors' dense (no sparsity) bf16 tensor-core numbers. Bandwidths are
# what NCCL all-reduce "bus bandwidth" reaches in practice (roughly 75-80 % of the link's
# one-direction peak: NVLink 3 = 300 GB/s, NVLink 4 = 450 GB/s; one 200 Gb/s HDR or
# 400 Gb/s NDR NIC per GPU between nodes). ``mfu`` is what well-tuned Megatron-style
# training of 7B-70B dense models reports (about 50 % on A100, 40-45 % on H100, whose
# matmuls outpace its memory system). ``layer_overhead_seconds``: ~45 kernels per layer for
# forward + backward at ~4 µs each when launch-bound. ``sequence_overhead_seconds`` is
# measured where we have a measurement (H200) and 0 elsewhere: calibrate to learn it.
HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "a100-80g": HardwareSpec(
        name="A100-80G", peak_flops=312e12, mfu=0.50, memory_bytes=80 * GIB,
        intra_node_bandwidth=230e9, inter_node_bandwidth=23e9, ranks_per_node=8,
        layer_overhead_seconds=2.0e-4,
    ),
    "h100-80g": HardwareSpec(
        name="H100-80G", peak_flops=989e12, mfu=0.45, memory_bytes=80 * GIB,
        intra_node_bandwidth=360e9, inter_node_bandwidth=45e9, ranks_per_node=8,
        layer_overhead_seconds=1.5e-4,
    ),
    "h200": HardwareSpec(
        # Same compute die as H100 SXM; 141 GB HBM3e (vendor GB = 1e9 bytes). Measured on one
        # H200 (torch 2.11 + CUDA 13, bf16; Llama-7B shape cut to 4 layers, one sequence per
        # micro-batch of 1K-16K tokens): b = 1.07e-5 s/token is 527 TFLOP/s on the matmuls,
        # mfu 0.53 of the 989 TFLOP/s peak (a plain bf16 matmul reaches ~790 TFLOP/s, 0.80);
        # 64 sequences of 256 tokens in one varlen micro-batch took 14 ms more than the
        # single-sequence fit gives: ~0.22 ms per sequence over 4 layers, 5.5e-5 s per layer.
        name="H200", peak_flops=989e12, mfu=0.53, memory_bytes=141 * 10**9,
        intra_node_bandwidth=360e9, inter_node_bandwidth=45e9, ranks_per_node=8,
        layer_overhead_seconds=1.5e-4, sequence_overhead_seconds=5.5e-5,
        source=(
            "mfu and sequence_overhead_seconds measured on one H200 (torch 2.11, CUDA 13, bf16, Llama-7B shape "
            "cut to 4 layers; issue #16 of this project, docs/cost_model.md); the rest from vendor datasheets"
        ),
    ),
    "cpu": HardwareSpec(
        # A few x86 cores in fp32 with AVX2/AVX-512 FMA; ranks are processes talking over
        # shared memory (gloo). Rough: calibrate on the real machine for numbers that matter.
        name="cpu", peak_flops=2e11, mfu=0.25, memory_bytes=16 * GIB,
        intra_node_bandwidth=5e9, inter_node_bandwidth=1e9, ranks_per_node=2,
        layer_overhead_seconds=5e-5,
    ),
}
"""Named accelerators: ``a100-80g``, ``h100-80g``, ``h200``, ``cpu``."""


def _lookup(registry: Mapping[str, Any], kind: str, name: str) -> Any:
    key = str(name).strip().lower()
    if key not in registry:
        raise ValueError(f"unknown {kind} preset {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[key]


def model_preset(name: str) -> ModelSpec:
    """The :data:`MODEL_PRESETS` entry called ``name`` (case-insensitive)."""
    return _lookup(MODEL_PRESETS, "model", name)


def hardware_preset(name: str) -> HardwareSpec:
    """The :data:`HARDWARE_PRESETS` entry called ``name`` (case-insensitive)."""
    return _lookup(HARDWARE_PRESETS, "hardware", name)
