"""Resume state (dataloader.state): tied to its data, every field checked, refusals that name the field.

Also what a sampler or stream with nothing to train on does (it refuses), the smaller-world
resume with ``overlong='error'`` at k ∈ {0, 1, mid, last} (map-style and streaming), and ``plan_sync='auto'`` without
torch.distributed on several ranks.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterator

import datasets
import numpy as np
import pytest
import torch.utils.data as tud
from test_dataloader_sampler import CAP, config, make_balancer

from dataloader import BalancedDataLoader
from dataloader.distributed import resolve_sync
from dataloader.sampler import BalancedBatchSampler, SamplerConfig
from dataloader.state import LengthsHash, cap_change, lengths_fingerprint


def sampler(lens: np.ndarray, world: int = 1, **kw: Any) -> BalancedBatchSampler:
    return BalancedBatchSampler(lens, make_balancer(world), config(**kw), world_size=world)


def global_batches(s: BalancedBatchSampler) -> list[list[int]]:
    return [sorted(x.plan.sample_ids()) for x in s]


LENS = np.random.default_rng(0).integers(1, CAP, size=60)


# -- tied to the data ------------------------------------------------------------------------------------
def test_a_state_from_a_retokenised_dataset_of_the_same_size_is_refused() -> None:
    s = sampler(LENS, sequences_per_step=8)
    it = iter(s)
    next(it)
    state = s.state_dict()
    it.close()
    retokenised = LENS.copy()
    retokenised[[3, 17]] += 1  # same size, two samples tokenised differently
    with pytest.raises(ValueError, match=r"lengths hash to 'blake2b:[0-9a-f]+', this sampler's lengths hash to") as e:
        sampler(retokenised, sequences_per_step=8).load_state_dict(state)
    assert "tokenisation" in str(e.value)
    sampler(LENS.copy(), sequences_per_step=8).load_state_dict(state)  # the same lengths load
    assert state["lengths_fingerprint"] == lengths_fingerprint(LENS)


def test_the_loader_refuses_a_state_of_another_tokenisation() -> None:
    rows = [list(range(1, 1 + int(n))) for n in LENS[:20]]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    loader = BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=4)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    it.close()
    other = datasets.Dataset.from_dict({"input_ids": [r + [7] if i == 5 else r for i, r in enumerate(rows)]})
    with pytest.raises(ValueError, match="lengths hash to"):
        BalancedDataLoader(other, balancer=make_balancer(1), sequences_per_step=4).load_state_dict(state)
    with pytest.raises(ValueError, match="the loader state must be a dict"):
        loader.load_state_dict([state])  # type: ignore[arg-type]


# -- every field checked -------------------------------------------------------------------------------------
def _edited(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(state)
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            out[outer][inner] = value
        elif value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epoch": "x"}, "sampler state has epoch='x'; it must be an integer >= 0"),
        ({"epoch": 1.5}, "epoch=1.5; it must be an integer"),
        ({"step_in_epoch": True}, "step_in_epoch=True; it must be an integer"),
        ({"global_step": -1}, "global_step=-1; it must be >= 0"),
        ({"world_size": 0}, "world_size=0; it must be >= 1"),
        ({"seed": "0"}, "seed='0'; it must be an integer"),
        ({"num_samples": None}, r"lacks \['num_samples'\]"),
        ({"lengths_fingerprint": "blake2b:00"}, "lengths hash to 'blake2b:00'"),
        ({"batching": [8]}, r"batching=\[8\]; it must be a dict"),
        ({"batching.max_length": 0}, "max_length=0; it must be >= 1"),
        ({"batching.drop_last": True}, "drop_last changed True → False"),
        ({"balancer": "tp1"}, "balancer='tp1'; it must be the balancer's state dict"),
        ({"version": 1}, "version 1 .saved by an earlier hydraulis"),
    ],
)
def test_every_field_is_checked_and_named(changes: dict[str, Any], message: str) -> None:
    s = sampler(LENS, sequences_per_step=8)
    state = s.state_dict()
    with pytest.raises(ValueError, match=message):
        s.load_state_dict(_edited(state, **changes))


def test_positions_are_range_checked_against_the_epoch() -> None:
    s = sampler(LENS, sequences_per_step=2)  # 30 steps per epoch
    state = s.state_at(0, 2, 2)
    with pytest.raises(ValueError, match="step_in_epoch=31 but epoch 0 has only 30 steps"):
        s.load_state_dict(_edited(state, step_in_epoch=31, global_step=31, epoch_start_step=0))
    with pytest.raises(ValueError, match=r"global_step=40 but epoch_start_step \+ step_in_epoch = 0 \+ 2 = 2"):
        s.load_state_dict(_edited(state, global_step=40))
    with pytest.raises(ValueError, match="must be a dict"):
        s.load_state_dict(None)  # type: ignore[arg-type]
    # The end of the epoch itself is a valid position: it continues with the next epoch.
    s.load_state_dict(s.state_at(0, 30, 30))
    first = next(iter(s))
    assert (first.epoch, first.step_in_epoch, first.step) == (1, 0, 30)


# -- the smaller world with overlong='error' (nothing was cut) -------------------------------------------------
@pytest.mark.parametrize("k", ["0", "1", "mid", "last"])
def test_resume_on_a_smaller_world_with_overlong_error_is_exact(k: str) -> None:
    lens = np.random.default_rng(3).integers(1, CAP + 1, size=70)  # every sample fits a single rank's cap (64)
    cfg = dict(tokens_per_step=500, seed=2, overlong="error")
    old = [BalancedBatchSampler(lens, make_balancer(4), config(**cfg), rank=r, world_size=4) for r in range(4)]
    assert old[0].max_length == 2 * CAP  # the 4-rank run's threshold: tp2 holds 128 tokens
    reference = [sorted(x.plan.sample_ids()) for x in BalancedBatchSampler(lens, make_balancer(4), config(**cfg), world_size=4)]
    n = len(reference)
    at = {"0": 0, "1": 1, "mid": n // 2, "last": n}[k]
    iters = [iter(s) for s in old]
    done = [[sorted(x.plan.sample_ids()) for x in (next(it) for _ in range(at))] for it in iters]
    state = old[0].state_dict()
    for it in iters:
        it.close()
    single = BalancedBatchSampler(lens, make_balancer(1), config(**cfg), world_size=1)
    assert single.max_length == CAP
    single.load_state_dict(state)  # was refused: "the run cut samples at max_length=128" (nothing was cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resuming on 1 ranks (was 4)"
        rest = global_batches(single)
    assert done[0] == reference[:at]
    if at < n:
        assert rest == reference[at:]
    else:  # a state saved after the last step continues with the next epoch
        epoch1 = BalancedBatchSampler(lens, make_balancer(1), config(**cfg), world_size=1)
        epoch1.set_epoch(1)
        assert rest == global_batches(epoch1)


def test_cap_change_names_what_would_be_cut_differently() -> None:
    lens = np.array([10, 70, 100, 200])
    assert cap_change(lens, "error", 128, 64) is None
    assert cap_change(lens, "split", 128, 128) is None
    assert cap_change(lens, "drop", 256, 220) is None  # nothing between the caps
    assert cap_change(lens, "drop", 128, 64) == (
        "2 sample(s) (e.g. sample 1 with 70 tokens) would be dropped differently at max_length=64 than at the run's max_length=128"
    )
    assert "3 sample(s)" in str(cap_change(lens, "truncate", 128, 64))
    with pytest.warns(UserWarning, match="dropped 1"):
        big = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=2, overlong="drop"), world_size=2)
    with pytest.warns(UserWarning, match="dropped 3"):
        small = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=2, overlong="drop"), world_size=1)
    with pytest.raises(ValueError, match="the run cut samples at max_length=128 tokens but the new balancer holds at most 64: 2 sample"):
        small.load_state_dict(big.state_dict())


# -- nothing to train on -------------------------------------------------------------------------------------------
def test_an_empty_or_fully_dropped_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="the dataset has no samples"):
        sampler(np.zeros(0, dtype=np.int64), sequences_per_step=2)
    with pytest.raises(ValueError, match="every one of the 2 samples is longer than max_length=64"), pytest.warns(UserWarning):
        sampler(np.array([100, 90]), sequences_per_step=2, overlong="drop")
    with pytest.raises(ValueError, match=r"drop_last=True leaves no step: the 3 samples do not fill one step \(sequences_per_step=4\)"):
        sampler(np.array([3, 4, 5]), sequences_per_step=4, drop_last=True)
    with pytest.raises(ValueError, match="the dataset has no samples"):
        BalancedDataLoader(datasets.Dataset.from_dict({"input_ids": [[1]]}).select([]), balancer=make_balancer(1), sequences_per_step=2)


class Stream(tud.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for r in self.rows:
            yield {"input_ids": r}


def stream_loader(rows: list[list[int]], **kw: Any) -> BalancedDataLoader:
    return BalancedDataLoader(Stream(rows), balancer=make_balancer(1), **{"sequences_per_step": 4, **kw})


def test_an_empty_or_fully_dropped_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="the stream yielded no samples for epoch 0"):
        list(stream_loader([]))
    with pytest.raises(ValueError, match="every one of the 2 samples of epoch 0's stream is longer than max_length=64"):
        list(stream_loader([[1] * 200, [2] * 300], overlong="drop"))  # make_balancer(1) holds 64 tokens
    with pytest.raises(ValueError, match="drop_last=True leaves no step in epoch 0"):
        list(stream_loader([[1, 2], [3]], drop_last=True))


# -- streams -----------------------------------------------------------------------------------------------------------
ROWS = [list(range(1, 1 + int(n))) for n in LENS[:30]]


def stream_state(k: int, rows: list[list[int]] = ROWS) -> dict[str, Any]:
    loader = stream_loader(rows)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    it.close()
    return state


def test_a_stream_state_is_tied_to_the_samples_it_skips() -> None:
    state = stream_state(3)["stream"]
    assert state["samples_consumed"] == 12 and state["epoch_start_step"] == 0
    want = LengthsHash()
    for r in ROWS[:12]:
        want.update(len(r))
    assert state["consumed_fingerprint"] == want.hexdigest()
    retokenised = [r + [9] if i == 4 else r for i, r in enumerate(ROWS)]
    other = stream_loader(retokenised)
    other.load_state_dict({"version": 1, "stream": state})
    with pytest.raises(ValueError, match="the first 12 samples of epoch 0's stream differ from those the state was saved on"):
        list(other)
    short = stream_loader(ROWS[:10])
    short.load_state_dict({"version": 1, "stream": state})
    with pytest.raises(ValueError, match="the state says 12 samples of epoch 0's stream were consumed, but the stream ends after 10"):
        list(short)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"samples_consumed": 2}, "samples_consumed=2 after step_in_epoch=3 finished steps; 3 steps consume at least 12"),
        ({"samples_consumed": -1}, "samples_consumed=-1; it must be >= 0"),
        ({"consumed_fingerprint": 7}, "consumed_fingerprint=7"),
        ({"epoch": "x"}, "stream state has epoch='x'"),
        ({"global_step": 9}, "global_step=9 but epoch_start_step"),
        ({"batching.sequences_per_step": 5}, "sequences_per_step changed 5 → 4"),
    ],
)
def test_stream_state_fields_are_checked(changes: dict[str, Any], message: str) -> None:
    state = stream_state(3)["stream"]
    with pytest.raises(ValueError, match=message):
        stream_loader(ROWS).load_state_dict({"version": 1, "stream": _edited(state, **changes)})
    with pytest.raises(ValueError, match="the stream state must be a dict"):
        stream_loader(ROWS).load_state_dict({"version": 1, "stream": "x"})


def test_a_stream_resumes_on_a_smaller_balancer_when_nothing_was_cut() -> None:
    rows = [[1] * 50, [2] * 60, [3] * 20, [4] * 10, [5] * 30, [6] * 40]
    big = BalancedDataLoader(Stream(rows), balancer=make_balancer(2), sequences_per_step=2, rank=0, world_size=2, plan_sync="none")
    it = iter(big)
    next(it)
    state = big.state_dict()
    it.close()
    assert state["stream"]["batching"]["max_length"] == 2 * CAP
    small = stream_loader(rows, sequences_per_step=2)
    small.load_state_dict(state)  # overlong='error': nothing was cut at 128, so 64 continues the same batches
    assert [sorted(sp.sample_ids for sp in b.specs) for b in small] != []
    assert small._stream.max_length == CAP
    split_big = BalancedDataLoader(Stream(rows), balancer=make_balancer(2), sequences_per_step=2, overlong="split", rank=0, world_size=2, plan_sync="none")
    cut = split_big.state_dict()
    with pytest.raises(ValueError, match="the run cuts samples at max_length=128 tokens .overlong='split'. but the new balancer holds at most 64"):
        stream_loader(rows, sequences_per_step=2, overlong="split").load_state_dict(cut)


@pytest.mark.parametrize("k", ["0", "1", "mid", "last"])
def test_a_stream_resumes_on_a_smaller_world_with_overlong_error_exactly(k: str) -> None:
    rows = [list(range(1, 1 + int(n))) for n in np.random.default_rng(5).integers(1, CAP + 1, size=40)]  # all fit 64

    def global_batches(loader: BalancedDataLoader) -> list[list[int]]:
        return [sorted(b.plan.sample_ids()) for b in loader]

    def four() -> BalancedDataLoader:  # rank 0 of a 4-rank run (the plans are every rank's; the state is rank 0's)
        return BalancedDataLoader(Stream(rows), balancer=make_balancer(4), tokens_per_step=300, rank=0, world_size=4, plan_sync="none")

    reference = global_batches(four())
    n = len(reference)
    at = {"0": 0, "1": 1, "mid": n // 2, "last": n}[k]
    big = four()
    it = iter(big)
    done = [sorted(next(it).plan.sample_ids()) for _ in range(at)]
    state = big.state_dict()
    it.close()
    assert state["stream"]["batching"]["max_length"] == 2 * CAP and done == reference[:at]
    small = stream_loader(rows, tokens_per_step=300, sequences_per_step=None)
    small.load_state_dict(state)  # overlong='error' cut nothing at 128: one rank (64 tokens) continues the same batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rest = global_batches(small)
    epoch1 = global_batches(stream_loader(rows, tokens_per_step=300, sequences_per_step=None))
    assert rest == (reference[at:] if at < n else epoch1)  # after the last step: the next epoch, whole


# -- plan_sync='auto' --------------------------------------------------------------------------------------------------
def test_auto_never_picks_none_for_several_ranks() -> None:
    assert resolve_sync("auto", 1) == "none"
    with pytest.raises(ValueError, match="plan_sync='auto' on world_size=2 ranks needs torch.distributed"):
        BalancedBatchSampler(LENS, make_balancer(2), SamplerConfig(sequences_per_step=4), rank=0, world_size=2)
    with pytest.raises(ValueError, match="plan_sync='verify' needs an initialised"):
        resolve_sync("verify", 2)
    with pytest.raises(ValueError, match="sync_timeout_s=0 must be a number of seconds > 0"):
        SamplerConfig(sequences_per_step=4, sync_timeout_s=0)
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        SamplerConfig(sequences_per_step=4, seed=-1)
