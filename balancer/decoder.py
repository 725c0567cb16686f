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
* **One kernel choice** (:func:`attention_backend`): ``varlen`` —
  ``torch.nn.attention.varlen.varlen_attn``, one launch for all sequences, CUDA in
  bf16/fp16, probed once and its signature read at run time (torch 2.10 takes
  ``is_causal``, 2.12+ ``window_size``) — else ``sdpa``: ``scaled_dot_product_attention``
  once per sequence, limited to the flash and memory-efficient backends on CUDA (never a
  backend that plans per shape).
* ``depth``: the forward may run only the first ``depth`` blocks (0: embedding, norm, head
  and loss), so calibration times a reduced depth with the same weights.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .specs import ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "ATTENTION_CHOICES",
    "DecoderStep",
    "PackedBatch",
    "attention_backend",
    "build_decoder",
    "decoder_step_fn",
    "pack_batch",
]

ATTENTION_CHOICES = ("auto", "varlen", "sdpa")
"""``auto``: ``varlen`` where it works, else ``sdpa``."""
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
    cu_seqlens: "torch.Tensor"
    """int32[n+1] sequence offsets."""
    lengths: tuple[int, ...]
    """Sequence lengths on the host (no device sync to read them)."""

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
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)).to(device),
        lengths=tuple(int(x) for x in lens),
    )


# -- the attention kernel: one choice, made here -------------------------------------------------


def _varlen_kwargs(gqa: bool) -> dict[str, Any] | None:
    """Keywords that make this torch's ``varlen_attn`` causal (and grouped), or ``None`` without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:  # torch 2.10
        kw: dict[str, Any] = {"is_causal": True}
    elif "window_size" in params:  # torch 2.12+: causal = no context to the right
        kw = {"window_size": (-1, 0)}
    else:
        return None
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


@functools.lru_cache(maxsize=None)
def _varlen_works(device: str, dtype: str) -> str | None:
    """``None`` when varlen attention runs forward + backward on ``device`` in ``dtype``, else why not."""
    import torch

    kw = _varlen_kwargs(gqa=False)
    if kw is None:
        return f"torch {torch.__version__} has no causal torch.nn.attention.varlen.varlen_attn"
    from torch.nn.attention.varlen import varlen_attn

    try:
        dt = getattr(torch, dtype)
        q = torch.randn(96, 2, 64, device=device, dtype=dt, requires_grad=True)
        cu = torch.tensor([0, 32, 96], device=device, dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 64, 64, **kw).sum().backward()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: use the other kernel
        return f"varlen_attn failed on {device} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


def attention_backend(device: "torch.device", dtype: "torch.dtype", requested: str = "auto") -> str:
    """The attention kernel for ``device`` and ``dtype``: ``"varlen"`` or ``"sdpa"``.

    ``auto`` takes ``varlen`` on CUDA in bf16/fp16 when torch has it and a probe of it runs
    (forward + backward on a small packed batch, once per device and dtype), else ``sdpa``.
    Asking for ``varlen`` where it cannot run raises ``ValueError`` with the reason.
    """
    import torch

    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"attention={requested!r} must be one of {list(ATTENTION_CHOICES)}")
    if requested == "sdpa":
        return "sdpa"
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        why = f"varlen attention needs CUDA in bf16/fp16, not {device.type} in {dtype}"
    else:
        why = _varlen_works(str(device), str(dtype).removeprefix("torch."))
    if why is None:
        return "varlen"
    if requested == "varlen":
        raise ValueError(f"{why}; use attention='sdpa' (or 'auto')")
    return "sdpa"


def _attention_fn(backend: str, device: "torch.device", num_heads: int, num_kv_heads: int) -> Callable[..., Any]:
    """``attend(q, k, v, batch)``: causal attention inside each sequence; q (T, nh, d), k/v (T, nkv, d)."""
    import torch
    from torch.nn import functional as F

    group = num_heads // num_kv_heads
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        kw = _varlen_kwargs(gqa=group > 1)
        assert kw is not None
        native_gqa = "enable_gqa" in kw

        def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
            if group > 1 and not native_gqa:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (T, nh, d)
            m = batch.max_seqlen
            return varlen_attn(q, k.contiguous(), v.contiguous(), batch.cu_seqlens, batch.cu_seqlens, m, m, **kw)

        return varlen

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def kernels() -> Any:
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    else:
        import contextlib

        kernels = contextlib.nullcontext

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (T, nh, d)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, nh, T, d)
        out = []
        start = 0
        with kernels():
            for s in batch.lengths:  # one call per sequence: the per-sequence cost d of this path
                sl = slice(start, start + s)
                out.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True))
                start += s
        y = out[0] if len(out) == 1 else torch.cat(out, dim=2)  # (1, nh, T, d)
        return y[0].transpose(0, 1)  # (T, nh, d)

    return sdpa


# -- the model -----------------------------------------------------------------------------------


def build_decoder(
    model: ModelSpec, device: "torch.device", dtype: "torch.dtype", seed: int = 0, attention: str = "auto"
) -> "torch.nn.Module":
    """The decoder of ``model``'s shape, its parameters created on ``device`` in ``dtype``.

    ``module(batch, depth=None)`` with a :class:`PackedBatch` returns the mean next-token
    cross-entropy (a scalar); ``depth`` runs only the first ``depth`` blocks.
    ``module.attention`` names the kernel (:func:`attention_backend`).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    backend = attention_backend(device, dtype, attention)
    attend = _attention_fn(backend, device, model.num_heads, int(model.num_kv_heads or model.num_heads))

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
            y = attend(q, k, v.view(T, self.nkv, self.d), batch)  # (T, nh, d)
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
            self.attention = backend
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
