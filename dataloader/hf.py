"""Packed micro-batches for Hugging Face models: the inputs that keep packed sequences apart.

A packed row holds several sequences; attention must stay inside each one, or the logits
(and gradients) silently differ from the unpacked run. Transformers can derive the
segments from restarting ``position_ids``, but only when no cache is in play — with the
default ``use_cache=True`` (every ``LlamaConfig`` etc.) it skips the detection and the
sequences attend to each other. :func:`hf_packed_inputs` does not rely on that detection;
it states the segments explicitly, in the form the model's attention implementation
consumes::

    logits = model(**hf_packed_inputs(mb, model)).logits     # mb: a PackedCollator micro-batch

==================================  ====================================================
``config._attn_implementation``     what is passed
==================================  ====================================================
``flash_attention_2/3/4``           ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``: the
                                    varlen kernel runs each segment alone (sliding windows
                                    are applied by the kernel, per layer)
``sdpa``                            a boolean block-diagonal causal mask (1, 1, T, T)
``eager``                           the same mask in additive form, in the model's dtype
``flex_attention``                  a ``BlockMask`` of the same pattern
==================================  ====================================================

plus ``input_ids``, ``position_ids`` (restarting at 0 per sequence, for RoPE/learned
positions) and ``use_cache=False``. Models with sliding-window layers get the window in
the mask: one mask when every layer has the same kind, else a mapping
``{"full_attention": …, "sliding_attention": …}`` (transformers' per-layer-type mask
convention). Anything it cannot make exact raises :class:`HFPackingError`: an unknown or
inference-only implementation, flash-attn not installed, layer kinds other than full and
sliding attention (chunked, linear/recurrent: state would flow between sequences), a
non-causal model, a model whose ``forward`` takes no ``position_ids``, a context-parallel
shard, or a row whose positions do not restart per segment.

The masks cost O(T²) memory, the same as the mask transformers builds itself for sdpa and
eager on packed rows; flash attention needs none.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .collate import block_causal_mask

__all__ = ["FLASH_IMPLEMENTATIONS", "MASK_IMPLEMENTATIONS", "HFPackingError", "hf_packed_inputs"]

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Implementations given varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``)."""
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
"""Implementations given an explicit block-diagonal causal mask."""
_LAYER_KINDS = ("full_attention", "sliding_attention")
"""``config.layer_types`` entries whose attention a mask describes exactly."""


class HFPackingError(ValueError):
    """A model/micro-batch combination whose packed run cannot be made exact."""


def hf_packed_inputs(
    micro_batch: Mapping[str, Any], model: Any, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)`` on a packed micro-batch, exact per sequence.

    ``micro_batch``: a :class:`~dataloader.PackedCollator` dict (one row: ``input_ids`` and
    ``position_ids`` (1, T), ``cu_seqlens`` (n+1,), ``max_seqlen``), already on the model's
    device. ``model``: a transformers model — also wrapped by DDP (``.module``),
    ``torch.compile`` (``._orig_mod``), PEFT (``get_base_model()``) or sharded by FSDP2 —
    or its config (then the ``forward`` signature is not checked). ``dtype``: of the
    additive eager mask; default the dtype of the model's input embeddings (float32 for
    a config). Labels are not passed: compute the loss with :func:`~dataloader.packed_loss`.
    Raises :class:`HFPackingError` for combinations it cannot make exact (module doc).
    """
    net, config = _unwrap(model)
    impl = _implementation(config)
    _check_config(config)
    if net is not None:
        _check_forward(net, impl)
    input_ids, position_ids, cu = _packed_row(micro_batch)
    if input_ids.shape[1] == 0:
        # An idle rank's empty micro-batch: HF models cannot run 0 tokens, but the rank must
        # still run forward/backward (DDP/FSDP collectives). One placeholder token (id 0,
        # position 0) runs instead; packed_loss gives an empty micro-batch zero loss whatever
        # its logits, so the placeholder adds nothing to any gradient.
        input_ids = torch.zeros((1, 1), dtype=input_ids.dtype, device=input_ids.device)
        position_ids = torch.zeros((1, 1), dtype=position_ids.dtype, device=position_ids.device)
        cu = torch.tensor([0, 1], dtype=torch.int64, device=input_ids.device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids}
    if net is None or "use_cache" in inspect.signature(net.forward).parameters:
        kwargs["use_cache"] = False  # no cache in training; transformers' own mask code also keys on it
    if impl in FLASH_IMPLEMENTATIONS:
        longest = int(torch.diff(cu).max())
        cu32 = cu.to(torch.int32)
        kwargs.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=longest, max_length_k=longest)
        return kwargs
    windows = _layer_windows(config, longest=int(torch.diff(cu).max()))
    if impl == "eager":
        mask_dtype = dtype or _embedding_dtype(net)
        masks = {kind: block_causal_mask(cu, mask_dtype, sliding_window=w) for kind, w in windows.items()}
    elif impl == "sdpa":
        masks = {kind: block_causal_mask(cu, torch.bool, sliding_window=w) for kind, w in windows.items()}
    else:
        masks = {kind: _flex_block_mask(cu, w) for kind, w in windows.items()}
    kwargs["attention_mask"] = next(iter(masks.values())) if len(masks) == 1 else masks
    return kwargs


# ---------------------------------------------------------------------------------------
# the model: what it is, what it runs
# ---------------------------------------------------------------------------------------
def _unwrap(model: Any) -> tuple[Any | None, Any]:
    """(the transformers model or None for a bare config, its config)."""
    net = model
    for _ in range(8):  # DDP → compile → PEFT wrappers, in any order
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net, torch.nn.Module):
            net = net._orig_mod
        elif callable(getattr(net, "get_base_model", None)):
            net = net.get_base_model()
        else:
            break
    if isinstance(net, torch.nn.Module):
        config = getattr(net, "config", None)
        if config is None:
            raise HFPackingError(
                f"{type(net).__name__} has no .config: hf_packed_inputs serves transformers models; for a custom "
                "model pass dataloader.block_causal_mask(mb['cu_seqlens']) or use cu_seqlens with a varlen kernel"
            )
        return net, config
    if hasattr(net, "model_type") and hasattr(net, "to_dict"):
        return None, net
    raise HFPackingError(f"expected a transformers model or config, got {type(model).__name__}")


def _implementation(config: Any) -> str:
    impl = getattr(config, "_attn_implementation", None)
    supported = (*MASK_IMPLEMENTATIONS, *FLASH_IMPLEMENTATIONS)
    if impl is None:
        raise HFPackingError(
            f"{type(config).__name__} has no attention implementation set; pass the model (from_pretrained/from_config "
            "sets it) or build the config with attn_implementation='sdpa'"
        )
    if impl not in supported:
        raise HFPackingError(
            f"attn_implementation={impl!r} cannot keep packed sequences apart exactly here; load the model with "
            f"attn_implementation= one of {', '.join(supported)}"
        )
    if impl in FLASH_IMPLEMENTATIONS and not _flash_available(impl):
        raise HFPackingError(
            f"attn_implementation={impl!r} but its flash-attn package is not installed (or no CUDA device); install it, "
            "or load the model with attn_implementation='sdpa'"
        )
    if impl == "flex_attention" and not hasattr(torch.nn.attention, "flex_attention"):
        raise HFPackingError(f"flex_attention needs torch >= 2.5 (this is {torch.__version__}); use 'sdpa'")
    return str(impl)


def _flash_available(impl: str) -> bool:
    from transformers import utils  # third-party, optional: imported only for flash models

    check = getattr(utils, f"is_flash_attn_{impl[-1]}_available", None)
    return bool(check is not None and check())


def _check_config(config: Any) -> None:
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise HFPackingError(
            f"{type(config).__name__} is not a causal decoder (is_encoder_decoder or is_causal=False); packing with "
            "hf_packed_inputs serves causal language models"
        )


def _check_forward(net: torch.nn.Module, impl: str) -> None:
    params = inspect.signature(net.forward).parameters
    if "position_ids" not in params:
        raise HFPackingError(
            f"{type(net).__name__}.forward takes no position_ids, so packed sequences cannot restart their positions; "
            "use a model class with position_ids (most decoder LMs) or PaddedCollator"
        )
    if impl in FLASH_IMPLEMENTATIONS and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise HFPackingError(
            f"{type(net).__name__}.forward takes no **kwargs, so the flash-attention varlen kwargs cannot reach its "
            "attention; load it with attn_implementation='sdpa'"
        )


def _layer_windows(config: Any, *, longest: int) -> dict[str, int | None]:
    """Sliding window (tokens, None = full causal) of each kind of attention layer the model has."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        # No per-layer kinds: the config's window (if any) applies to every layer (Mistral, Mixtral).
        return {"full_attention": window}
    unknown = sorted(set(kinds) - set(_LAYER_KINDS))
    if unknown:
        raise HFPackingError(
            f"{type(config).__name__} has layer types {unknown}; only {', '.join(_LAYER_KINDS)} can be kept exact in "
            "a packed row (chunked or recurrent layers would carry state across sequences). Use PaddedCollator"
        )
    if "sliding_attention" in kinds and window is None:
        raise HFPackingError(f"{type(config).__name__} has sliding_attention layers but sliding_window=None")
    present = [k for k in _LAYER_KINDS if k in kinds]
    if len(present) == 2 and longest <= window:
        present = ["full_attention"]  # no sequence reaches past the window: both kinds see the same keys
    return {k: (window if k == "sliding_attention" else None) for k in present}


def _embedding_dtype(net: torch.nn.Module | None) -> torch.dtype:
    if net is None:
        return torch.float32
    weight = getattr(net.get_input_embeddings(), "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


# ---------------------------------------------------------------------------------------
# the micro-batch
# ---------------------------------------------------------------------------------------
def _packed_row(mb: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (1, T), position_ids (1, T), cu_seqlens int64 on the row's device), validated."""
    if "target_ids" in mb or "cp" in mb:
        raise HFPackingError(
            "this micro-batch is a context-parallel shard (ContextParallelCollator); Hugging Face models cannot attend "
            "across cp ranks — use PackedCollator with cp=1 candidates"
        )
    missing = [k for k in ("input_ids", "position_ids", "cu_seqlens") if k not in mb]
    if missing:
        raise HFPackingError(f"micro-batch lacks {missing}; build it with PackedCollator (keys: {sorted(mb)})")
    input_ids, position_ids = mb["input_ids"], mb["position_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or position_ids.shape != input_ids.shape:
        raise HFPackingError(
            f"expected one packed row: input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
            "must both be (1, T), as PackedCollator makes them"
        )
    cu = mb["cu_seqlens"].to(device=input_ids.device, dtype=torch.int64).reshape(-1)
    total = input_ids.shape[1]
    if cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((torch.diff(cu) < 0).any()):
        raise HFPackingError(f"cu_seqlens {cu.tolist()[:8]}… must rise from 0 to the row's {total} tokens")
    pos = torch.arange(total, device=cu.device)
    start = cu[torch.searchsorted(cu[1:], pos, right=True)]  # first token of every token's segment
    if not torch.equal(position_ids[0].to(torch.int64), pos - start):
        raise HFPackingError(
            "position_ids do not restart at 0 at every cu_seqlens boundary; RoPE would see wrong positions "
            "(build the micro-batch with PackedCollator)"
        )
    return input_ids, position_ids, cu


def _flex_block_mask(cu: torch.Tensor, window: int | None) -> Any:
    """A flex-attention ``BlockMask`` with the pattern of :func:`block_causal_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = int(cu[-1])
    segment = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)[None]  # (1, T)

    def allowed(b: Any, h: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ok = (segment[b, q] == segment[b, k]) & (k <= q)
        return ok & (q - k < window) if window is not None else ok

    return create_block_mask(allowed, B=1, H=None, Q_LEN=total, KV_LEN=total, device=cu.device)
