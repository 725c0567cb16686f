"""Collators: turn the samples of one micro-batch into model inputs.

* :class:`PackedCollator` — one row, no padding between sequences (the design.md §7 dict);
* :class:`ContextParallelCollator` — the packed row cut into this cp rank's head+tail chunks;
* :class:`PaddedCollator` — one row per sequence with ``attention_mask``, for models without
  variable-length attention;
* any plain ``collate_fn(samples)`` of the user's, called on the micro-batch's samples.

A hydraulis collator is called as ``collator(samples, spec)`` with the
:class:`~dataloader.spec.MicroBatchSpec` of the micro-batch (sample ids, planned loss
tokens, the step's ``global_loss_tokens``, cp coordinates); ``spec`` may be omitted when
collating by hand, and then the batch is its own global batch.

Labels follow the Hugging Face convention: ``labels`` are aligned with ``input_ids`` and
the model shifts them, so position ``t`` is predicted from position ``t−1``. In a packed
row the first token of every sequence would be "predicted" from the previous sequence's
last token, so its label is always ``-100``: a sequence of ``s`` tokens has at most
``s−1`` loss tokens and no loss crosses a boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from strategies.context import cp_local_seqlens, cp_token_index

from .lengths import IGNORE_INDEX
from .spec import MicroBatchSpec

__all__ = [
    "Collator",
    "ContextParallelCollator",
    "PackedCollator",
    "PaddedCollator",
    "block_causal_mask",
    "cp_shard",
]


class Collator(ABC):
    """Base of collators that receive the micro-batch's :class:`MicroBatchSpec`."""

    @abstractmethod
    def __call__(self, samples: Sequence[Mapping[str, Any]], spec: MicroBatchSpec | None = None) -> Any:
        """Collate ``samples`` (already cut to their pieces) in the order of ``spec.sample_ids``.

        A sample is a dict with the token field (and optionally labels), or the token ids themselves.
        """


def _tokens(sample: Any, key: str, i: int) -> np.ndarray:
    """Token ids of a sample: ``sample[key]`` for dicts, the sample itself for plain sequences/tensors."""
    if isinstance(sample, Mapping):
        if key not in sample:
            raise ValueError(f"sample {i} has no field {key!r}; fields: {sorted(sample)}. Set input_key=... on the collator")
        sample = sample[key]
    arr = np.asarray(sample)
    if arr.ndim != 1:
        raise ValueError(f"sample {i}: field {key!r} has shape {arr.shape}; expected a 1-D list of token ids")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"sample {i}: field {key!r} has dtype {arr.dtype}; expected integer token ids")
    return arr.astype(np.int64, copy=False)


def _default_spec(seq_lens: np.ndarray, loss_per_seq: np.ndarray) -> MicroBatchSpec:
    n = len(seq_lens)
    lens = tuple(int(s) for s in seq_lens)
    return MicroBatchSpec(
        step=0,
        epoch=0,
        step_in_epoch=0,
        index=0,
        num_micro_batches=1,
        sample_ids=tuple(range(n)),
        starts=(0,) * n,
        ends=lens,
        full_lengths=lens,
        loss_tokens=tuple(int(x) for x in loss_per_seq),
        global_loss_tokens=int(loss_per_seq.sum()),
    )


def _first_mismatch(got: np.ndarray, want: Sequence[int]) -> int | None:
    """Index of the first entry where ``got`` differs from ``want`` (same length), or None."""
    bad = np.flatnonzero(got != np.asarray(want, dtype=np.int64))
    return int(bad[0]) if bad.size else None


def _check_ids(values: np.ndarray, cu: np.ndarray, spec: MicroBatchSpec | None, key: str, rule: str) -> None:
    """Raise naming the sample and position of the first negative value (an embedding would wrap round or fail later)."""
    if not values.size or int(values.min()) >= 0:
        return
    at = int(np.flatnonzero(values < 0)[0])
    j = int(np.searchsorted(cu, at, side="right")) - 1
    sid = spec.sample_ids[j] if spec is not None else j
    raise ValueError(f"sample {sid}: {key!r} has {int(values[at])} at position {at - int(cu[j])}; {rule}")


def _check_seq_lens(seq_lens: np.ndarray, spec: MicroBatchSpec) -> None:
    want = spec.seq_lens
    if len(want) != len(seq_lens):
        raise ValueError(f"collator got {len(seq_lens)} samples but the micro-batch plans {len(want)}")
    i = _first_mismatch(seq_lens, want)
    if i is not None:
        raise ValueError(
            f"sample {spec.sample_ids[i]} has {int(seq_lens[i])} tokens in the micro-batch but the plan expects "
            f"{want[i]}; the length source does not match the dataset (recompute the lengths from this dataset)"
        )


@dataclass(kw_only=True)
class PackedCollator(Collator):
    """Pack a micro-batch into one row: the design.md §7 dict.

    Output (``T`` = total tokens, ``n`` = sequences): ``input_ids`` (1, T) int64,
    ``labels`` (1, T) int64 with ``-100`` on the first token of every sequence,
    ``position_ids`` (1, T) restarting at 0 per sequence, ``cu_seqlens`` int32 (n+1,)
    (n+2 with a padding segment), ``max_seqlen`` int, ``seq_lens`` int64 (n,),
    ``sample_ids`` int64 (n,), ``num_loss_tokens`` int, ``global_loss_tokens`` int.
    """

    input_key: str = "input_ids"
    """Sample field with the token ids."""
    labels_key: str = "labels"
    """Sample field with labels (HF convention, unshifted); when absent, labels = input ids."""
    pad_to_multiple_of: int = 1
    """Pad the row to a multiple of this many tokens (kernels, cp chunking); 1 = no padding."""
    pad_token_id: int = 0
    """Token id of padding; padded tokens have label ``-100`` and their own cu_seqlens segment."""
    check_loss_tokens: bool = True
    """Raise when a sample's loss tokens differ from what the plan counted (wrong normalisation)."""

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of} must be >= 1 token")

    def pack_numpy(self, samples: Sequence[Mapping[str, Any]], spec: MicroBatchSpec | None = None) -> dict[str, Any]:
        """The packed row as numpy arrays (the tensor form is :meth:`__call__`)."""
        ids = [_tokens(s, self.input_key, i) for i, s in enumerate(samples)]
        seq_lens = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
        if spec is not None:
            _check_seq_lens(seq_lens, spec)
        has_labels = [isinstance(s, Mapping) and self.labels_key in s for s in samples]
        if any(has_labels) and not all(has_labels):
            i = has_labels.index(False)
            raise ValueError(f"sample {i} has no {self.labels_key!r} while others do; give labels for every sample or none")
        total = int(seq_lens.sum())
        cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(seq_lens, out=cu[1:])
        input_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        _check_ids(input_ids, cu, spec, self.input_key, "token ids are >= 0 (a tokenizer's ids; -100 belongs in labels)")
        if ids and has_labels[0]:
            labels_list = [_tokens(s, self.labels_key, i) for i, s in enumerate(samples)]
            for i, (a, b) in enumerate(zip(ids, labels_list)):
                if a.size != b.size:
                    raise ValueError(f"sample {i}: {self.labels_key!r} has {b.size} entries, {self.input_key!r} has {a.size}")
            labels = np.concatenate(labels_list)
            _check_ids(np.where(labels == IGNORE_INDEX, 0, labels), cu, spec, self.labels_key, f"labels are token ids >= 0 or {IGNORE_INDEX} (no loss)")
        else:
            labels = input_ids.copy()
        labels[cu[:-1][seq_lens > 0]] = IGNORE_INDEX  # nothing is predicted across a boundary
        carries = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(labels != IGNORE_INDEX, out=carries[1:])
        loss_per_seq = carries[cu[1:]] - carries[cu[:-1]]  # loss tokens per sequence
        if spec is None:
            spec = _default_spec(seq_lens, loss_per_seq)
        elif self.check_loss_tokens and (i := _first_mismatch(loss_per_seq, spec.loss_tokens)) is not None:
            raise ValueError(
                f"sample {spec.sample_ids[i]} has {int(loss_per_seq[i])} loss tokens (labels != -100 after the first "
                f"token) but the plan counted {spec.loss_tokens[i]}; pass loss_tokens=compute_loss_tokens(dataset) to "
                "the sampler so the global loss normalisation is exact"
            )
        position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], seq_lens)
        pad = (-total) % self.pad_to_multiple_of
        cu_seqlens = cu
        if pad:
            input_ids = np.concatenate([input_ids, np.full(pad, self.pad_token_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
            position_ids = np.concatenate([position_ids, np.arange(pad, dtype=np.int64)])
            cu_seqlens = np.append(cu, total + pad)
        max_seqlen = int(max(int(seq_lens.max()) if seq_lens.size else 0, pad))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seqlens": cu_seqlens.astype(np.int32),
            "max_seqlen": max_seqlen,
            "seq_lens": seq_lens,
            "sample_ids": np.asarray(spec.sample_ids, dtype=np.int64),
            "num_loss_tokens": int(loss_per_seq.sum()),
            "global_loss_tokens": int(spec.global_loss_tokens),
        }

    def __call__(self, samples: Sequence[Mapping[str, Any]], spec: MicroBatchSpec | None = None) -> dict[str, Any]:
        return _to_tensors(self.pack_numpy(samples, spec))


def _to_tensors(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in d.items():
        if isinstance(val, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(val))
            out[key] = t.unsqueeze(0) if key in _ROW_KEYS else t
        else:
            out[key] = val
    return out


_ROW_KEYS = frozenset({"input_ids", "labels", "position_ids", "target_ids"})
"""Per-token fields that get a leading batch dimension of 1."""


# ---------------------------------------------------------------------------------------
# context parallelism
# ---------------------------------------------------------------------------------------
def cp_shard(packed: Mapping[str, Any], cp: int, cp_rank: int) -> dict[str, Any]:
    """This cp rank's tokens of a packed micro-batch: the head+tail chunks of every segment.

    Uses :func:`strategies.context.cp_token_index` (the runtime's attention uses the same
    function, so both agree on the layout). Every cu_seqlens segment — including a
    padding segment — is cut into ``2·cp`` chunks; rank ``r`` holds chunks ``r`` and
    ``2·cp−1−r`` of each.

    Labels cannot be shifted after sharding (a token's target may sit on another cp rank),
    so the shard carries ``target_ids`` instead: the next-token target of every local
    token, already shifted (``-100`` at the end of each sequence and on padding). Compute
    the loss as ``cross_entropy(logits, target_ids)`` with **no** shift. Output keys:
    ``input_ids``, ``target_ids``, ``position_ids`` (positions inside each sequence, for
    RoPE), ``cu_seqlens`` (local segments, int32), ``max_seqlen`` (local), ``seq_lens`` and
    ``local_seq_lens``, ``token_index`` (positions in the packed row), ``sample_ids``,
    ``num_loss_tokens`` (local), ``global_loss_tokens``, ``cp``, ``cp_rank``.
    Accepts the tensor dict of :class:`PackedCollator` or its :meth:`~PackedCollator.pack_numpy` form.
    """
    if cp < 1 or not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} must be in 0..cp-1 with cp={cp} >= 1")

    def flat(key: str) -> np.ndarray:
        v = packed[key]
        return (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).reshape(-1)

    input_ids, labels, position_ids = flat("input_ids"), flat("labels"), flat("position_ids")
    cu = flat("cu_seqlens").astype(np.int64)
    segments = np.diff(cu)
    targets = np.concatenate([labels[1:], [IGNORE_INDEX]]).astype(np.int64) if labels.size else labels.astype(np.int64)
    index = cp_token_index(segments, cp, cp_rank)
    local = cp_local_seqlens(segments, cp, cp_rank)
    local_cu = np.zeros(len(local) + 1, dtype=np.int64)
    np.cumsum(local, out=local_cu[1:])
    shard = {
        "input_ids": input_ids[index],
        "target_ids": targets[index],
        "position_ids": position_ids[index],
        "cu_seqlens": local_cu.astype(np.int32),
        "max_seqlen": int(local.max()) if local.size else 0,
        "seq_lens": flat("seq_lens").astype(np.int64),
        "local_seq_lens": local,
        "token_index": index,
        "sample_ids": flat("sample_ids").astype(np.int64),
        "num_loss_tokens": int((targets[index] != IGNORE_INDEX).sum()),
        "global_loss_tokens": int(packed["global_loss_tokens"]),
        "cp": cp,
        "cp_rank": cp_rank,
    }
    return _to_tensors(shard)


@dataclass(kw_only=True)
class ContextParallelCollator(Collator):
    """Pack, then keep this rank's head+tail chunks (:func:`cp_shard`) per ``spec.cp``/``spec.cp_rank``.

    With ``cp == 1`` in the spec the shard is the whole packed row (with ``target_ids``).
    The row is padded to a multiple of ``2·cp`` tokens by default, so every cp rank
    holds the same number of tokens.
    """

    input_key: str = "input_ids"
    labels_key: str = "labels"
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    """Row padding in tokens; ``None`` = ``2·cp`` of the micro-batch's replica."""
    check_loss_tokens: bool = True

    def __call__(self, samples: Sequence[Mapping[str, Any]], spec: MicroBatchSpec | None = None) -> dict[str, Any]:
        cp, cp_rank = (spec.cp, spec.cp_rank) if spec is not None else (1, 0)
        packer = PackedCollator(
            input_key=self.input_key,
            labels_key=self.labels_key,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of or 2 * cp,
            check_loss_tokens=self.check_loss_tokens,
        )
        return cp_shard(packer.pack_numpy(samples, spec), cp, cp_rank)


# ---------------------------------------------------------------------------------------
# padded batches
# ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PaddedCollator(Collator):
    """One row per sequence, right-padded, with ``attention_mask`` (models without varlen attention).

    Output: ``input_ids`` (n, L), ``attention_mask`` (n, L) int64 (1 = real token),
    ``labels`` (n, L) with ``-100`` on padding and on each row's first token, ``seq_lens``,
    ``sample_ids``, ``num_loss_tokens``, ``global_loss_tokens``. ``L`` is the longest
    sequence rounded up to ``pad_to_multiple_of``.
    """

    input_key: str = "input_ids"
    labels_key: str = "labels"
    pad_to_multiple_of: int = 1
    pad_token_id: int = 0
    check_loss_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of} must be >= 1 token")

    def __call__(self, samples: Sequence[Mapping[str, Any]], spec: MicroBatchSpec | None = None) -> dict[str, Any]:
        packed = PackedCollator(
            input_key=self.input_key, labels_key=self.labels_key, check_loss_tokens=self.check_loss_tokens
        ).pack_numpy(samples, spec)
        seq_lens = packed["seq_lens"]
        n = len(seq_lens)
        longest = int(seq_lens.max()) if n else 0
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((n, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        mask = np.arange(width)[None, :] < seq_lens[:, None]  # (n, L) True on real tokens
        input_ids[mask] = packed["input_ids"]
        labels[mask] = packed["labels"]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "seq_lens": torch.from_numpy(seq_lens),
            "sample_ids": torch.from_numpy(packed["sample_ids"]),
            "num_loss_tokens": packed["num_loss_tokens"],
            "global_loss_tokens": packed["global_loss_tokens"],
        }


# ---------------------------------------------------------------------------------------
# attention masks
# ---------------------------------------------------------------------------------------
def block_causal_mask(
    cu_seqlens: torch.Tensor | np.ndarray | Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """4-D attention mask (1, 1, T, T) for a packed row: causal inside each segment.

    Query ``q`` may attend key ``k`` when both lie in the same ``cu_seqlens`` segment,
    ``k <= q`` and, with ``sliding_window`` (tokens), ``q - k < sliding_window`` (the
    Hugging Face convention: a window of ``w`` sees the token itself and ``w - 1`` before
    it). ``dtype=torch.bool`` gives True where attention is allowed (sdpa); a float dtype
    gives the additive form, 0 where allowed and the dtype's most negative value elsewhere
    (eager). Built on ``device`` (default: the device of ``cu_seqlens``); O(T²) memory, the
    same as the mask transformers materialises itself for sdpa/eager packed rows. For
    Hugging Face models use :func:`dataloader.hf_packed_inputs`, which picks the form.
    """
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 token (or None for full causal attention)")
    cu = torch.as_tensor(cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else np.asarray(cu_seqlens, dtype=np.int64))
    cu = cu.to(device=device if device is not None else cu.device, dtype=torch.int64).reshape(-1)
    total = int(cu[-1]) if cu.numel() else 0
    pos = torch.arange(total, device=cu.device)
    segment = torch.searchsorted(cu[1:], pos, right=True)  # segment index of every token
    allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])  # (T, T) [query, key]
    if sliding_window is not None:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    if dtype == torch.bool:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype, device=cu.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
