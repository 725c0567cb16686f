"""A Llama-style decoder on packed micro-batches: the workload that calibration times and
that measured plans run (:mod:`balancer.calibrate`, :mod:`balancer.measure`).

The shape comes from a :class:`~balancer.specs.ModelSpec`: embedding, blocks of RMSNorm →
causal attention with rotary positions and grouped KV heads → RMSNorm → SwiGLU (or GELU)
MLP, final norm, LM head, next-token cross-entropy. Its parameter count equals
``ModelSpec.num_parameters``. torch is imported inside the functions, so importing the
balancer stays light.

* **Built where it runs.** Parameters are created under a ``torch.device`` context with the
  compute dtype as the default dtype: a 7B shape is born in bf16 on the GPU and never
  exists as an fp32 copy in host RAM (on the ``meta`` device it takes no memory at all).
* **Packed micro-batches.** One row of tokens holds the micro-batch's sequences back to
  back (:class:`PackedBatch`): positions restart per sequence, attention stays inside each
  sequence (causal), and the loss is next-token within each sequence — what the training
  collator feeds a model (``cu_seqlens``, ``position_ids``).
* **The kernel training runs.** Attention is :func:`strategies.kernels.causal_attention`
  with the kernel :func:`strategies.kernels.choose_kernel` picks for the device and dtype —
  the one choice the runtime trains with too (``flash_attn`` or torch's ``varlen_attn`` on
  CUDA in bf16/fp16 after a self-check, else SDPA once per sequence limited to the flash
  and memory-efficient backends, never one that plans per shape). ``attention=`` asks for
  ``"auto"`` (that choice) or a kernel by name (:data:`strategies.kernels.KERNEL_CHOICES`).
* ``depth``: the forward may run only the first ``depth`` blocks (0: embedding, norm, head
  and loss), so calibration times a reduced depth with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .specs import ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from strategies.kernels import AttentionSegments

__all__ = [
    "DecoderStep",
    "PackedBatch",
    "build_decoder",
    "decoder_step_fn",
    "pack_batch",
]

IGNORE_INDEX = -100
"""Label of a sequence's last token (nothing to predict inside the micro-batch)."""


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """One packed micro-batch on its device. ``T`` tokens, ``n`` sequences."""

    input_ids: "torch.Tensor"
    """int64[T] token ids, sequences back to back."""
    labels: "torch.Tensor"
    """int64[T] next token within the sequence; :data:`IGNORE_INDEX` at each sequence's end."""
    positions: "torch.Tensor"
    """int64[T] position within its sequence (restarts at 0)."""
    segments: "AttentionSegments"
    """Where attention may look (one causal segment per sequence), its kernel tensors on the device."""
    lengths: tuple[int, ...]
    """Sequence lengths on the host (no device sync to read them)."""

    @property
    def cu_seqlens(self) -> "torch.Tensor":
        """int32[n+1] sequence offsets on the device."""
        return self.segments.cu_q

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def loss_tokens(self) -> int:
        return sum(self.lengths) - len(self.lengths)


def pack_batch(
    lengths: Sequence[int], vocab_size: int, device: "torch.device", generator: "torch.Generator"
) -> PackedBatch:
    """Random tokens for sequences of ``lengths`` (each >= 1), packed into one row on ``device``."""
    import torch

    from strategies.kernels import build_segments

    lens = np.asarray([int(x) for x in lengths], dtype=np.int64)
    if lens.ndim != 1 or lens.size == 0 or (lens < 1).any():
        raise ValueError(f"pack_batch: lengths {list(lengths)} must be one or more sequences of >= 1 token")
    cu = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    total = int(cu[-1])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)
    ids = torch.randint(0, vocab_size, (total,), generator=generator)
    labels = torch.empty_like(ids)
    labels[:-1] = ids[1:]
    labels[torch.from_numpy(cu[1:] - 1)] = IGNORE_INDEX
    return PackedBatch(
        input_ids=ids.to(device),
        labels=labels.to(device),
        positions=torch.from_numpy(positions).to(device),
        segments=build_segments(lens, device=device),
        lengths=tuple(int(x) for x in lens),
    )


# -- the model -----------------------------------------------------------------------------------


def build_decoder(
    model: ModelSpec, device: "torch.device", dtype: "torch.dtype", seed: int = 0, attention: str = "auto"
) -> "torch.nn.Module":
    """The decoder of ``model``'s shape, its parameters created on ``device`` in ``dtype``.

    ``module(batch, depth=None)`` with a :class:`PackedBatch` returns the mean next-token
    cross-entropy (a scalar); ``depth`` runs only the first ``depth`` blocks.
    ``attention``: ``"auto"`` or a kernel name (:data:`strategies.kernels.KERNEL_CHOICES`),
    resolved by :func:`strategies.kernels.choose_kernel` — ``ValueError`` when the kernel
    cannot run on ``device`` in ``dtype``. ``module.attention`` names the kernel it runs.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from strategies.kernels import causal_attention, choose_kernel

    kernel = choose_kernel(attention, device, dtype)  # the runtime's choice, made in one place

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, d = model.hidden_size, model.head_dim
            self.nh, self.nkv, self.d = model.num_heads, int(model.num_kv_heads or model.num_heads), d
            self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
            self.qkv = nn.Linear(h, model.q_size + 2 * model.kv_size, bias=False)
            self.out = nn.Linear(model.q_size, h, bias=False)
            self.up = nn.Linear(h, (2 if model.gated_mlp else 1) * model.ffn_hidden_size, bias=False)
            self.down = nn.Linear(model.ffn_hidden_size, h, bias=False)

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
            T = x.shape[0]
            q, k, v = self.qkv(self.norm1(x)).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
            q = rotate(q.view(T, self.nh, self.d), cos, sin)  # (T, nh, d)
            k = rotate(k.view(T, self.nkv, self.d), cos, sin)  # (T, nkv, d)
            v = v.view(T, self.nkv, self.d)  # (T, nkv, d)
            y = causal_attention(q, k, v, batch.segments, kernel)  # (T, nh, d)
            x = x + self.out(y.reshape(T, self.nh * self.d))
            u = self.up(self.norm2(x))
            if model.gated_mlp:
                gate, up = u.chunk(2, dim=-1)
                u = F.silu(gate) * up
            else:
                u = F.gelu(u)
            return x + self.down(u)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = kernel
            self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
            self.blocks = nn.ModuleList(Block() for _ in range(model.num_layers))
            self.norm = RMSNorm(model.hidden_size)
            self.head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
            if model.tie_embeddings:
                self.head.weight = self.embed.weight
            d = model.head_dim
            inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
            self.register_buffer("inv_freq", inv, persistent=False)

        def forward(self, batch: PackedBatch, depth: int | None = None) -> torch.Tensor:
            ang = batch.positions.to(torch.float32)[:, None] * self.inv_freq.float()[None, :]  # (T, d/2)
            cos = torch.cat((ang.cos(), ang.cos()), -1).to(self.head.weight.dtype)[:, None, :]  # (T, 1, d)
            sin = torch.cat((ang.sin(), ang.sin()), -1).to(self.head.weight.dtype)[:, None, :]
            x = self.embed(batch.input_ids)  # (T, h)
            for block in self.blocks[: len(self.blocks) if depth is None else depth]:
                x = block(x, cos, sin, batch)
            logits = self.head(self.norm(x)).float()  # (T, V)
            loss = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
            return loss / max(1, batch.loss_tokens)

    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # parameters are born in the compute dtype ...
    except (TypeError, ValueError):  # a torch without low-precision defaults: cast on the device below
        pass
    try:
        with torch.device(device):  # ... on the device: no host copy, no fp32 copy
            net = Decoder()
    finally:
        torch.set_default_dtype(before)
    return net.to(dtype=dtype) if net.head.weight.dtype != dtype else net


class DecoderStep:
    """``step(micro_batch, depth=None)``: forward + backward of :func:`build_decoder` on one
    packed micro-batch of random tokens (``micro_batch``: its sequence lengths). Gradients
    are dropped after each step. Does not synchronise: timers do."""

    def __init__(self, net: "torch.nn.Module", vocab_size: int, device: "torch.device", seed: int = 0) -> None:
        import torch

        self.net = net
        self.vocab_size = vocab_size
        self.device = device
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def attention(self) -> str:
        return str(getattr(self.net, "attention", "custom"))

    def __call__(self, micro_batch: Sequence[int], depth: int | None = None) -> None:
        batch = pack_batch(micro_batch, self.vocab_size, self.device, self._gen)
        self.net(batch, depth).backward()
        for p in self.net.parameters():
            p.grad = None


def decoder_step_fn(
    model: ModelSpec, device: "torch.device", dtype: "torch.dtype", seed: int = 0, attention: str = "auto"
) -> DecoderStep:
    """A :class:`DecoderStep` on a fresh :func:`build_decoder` of ``model``."""
    return DecoderStep(build_decoder(model, device, dtype, seed, attention), model.vocab_size, device, seed)
