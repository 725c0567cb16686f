"""One planning thread's collectives on the plan group, and the decision every rank takes from them.

:class:`PlanExchange` is what :class:`~dataloader.planning.PlanStream` (one global batch
per step) and :class:`~dataloader.stream_shards.ShardRounds` (per-rank shares) share: every
collective goes through :meth:`PlanExchange.collective` — which turns a peer's silence into
a :class:`PlanSyncError` naming the timeout and counts its wall time in
``stats.collective_seconds`` — and every round ends in :meth:`PlanExchange.gather_outcomes`
and :meth:`PlanExchange.decide`: continue, stop, or raise on *every* rank alike.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from strategies.plan import StepPlan

from .agreement import END, ERROR, STOP, PlanBatch, decode_outcome, describe_groups, encode_outcome, group_ranks

__all__ = ["QUIT", "SAME_STEPS", "CollectiveTimes", "PlanExchange", "PlanSyncError", "RoundOutcome"]


class PlanSyncError(RuntimeError):
    """Ranks disagree on a step (data, plan, or epoch length), or a peer failed or stopped early."""


QUIT = object()
"""Round result: this rank stopped (``break``/``close``) together with its peers, and they know."""
SAME_STEPS = "every rank must run the same steps (break on every rank, or call loader.close() on every rank)"


class CollectiveTimes(Protocol):
    """Where collective time is counted: a :class:`~dataloader.config.SamplerStats` (config imports
    planning, which imports this module, so the class is not named here)."""

    collective_seconds: float
    """Wall seconds inside the plan group's collectives so far."""


@dataclass(slots=True)
class RoundOutcome:
    """This rank's outcome for one round before the exchange (a kind of :data:`~dataloader.agreement.KINDS`)."""

    kind: str
    step: int
    batch: PlanBatch | None = None
    plan: StepPlan | None = None
    error: BaseException | None = None


class PlanExchange:
    """The plan group's collectives of one planning thread (module docstring).

    ``group`` ``None``: one rank, nothing is exchanged. ``stopping`` is set when this rank's
    consumer stopped iterating (a peer's stop is then a stop, not an error). ``stats`` (when
    given) receives ``collective_seconds``.
    """

    def __init__(
        self,
        *,
        sync: str,
        group: Any,
        rank: int,
        stopping: threading.Event,
        data_hint: str,
        timeout_s: float | None,
        stats: CollectiveTimes | None = None,
    ) -> None:
        self.sync, self.group, self.rank = sync, group, rank
        self.stopping = stopping
        self.data_hint = data_hint
        self.timeout_s = timeout_s
        self.stats = stats

    def world_size(self) -> int:
        import torch.distributed as dist

        return 1 if self.group is None else dist.get_world_size(self.group)

    def collective(self, fn: Callable[[], Any], what: str, step: int) -> None:
        """Run one collective ``fn`` (named ``what`` in errors) of ``step``; its wall time counts in ``stats``."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a peer that died or never came: say so, on this rank
            limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "its timeout"
            raise PlanSyncError(
                f"plan exchange ({what}) of step {step} failed: {type(e).__name__}: {e}. A peer rank did not take part "
                f"within the plan group's timeout ({limit}): it probably failed or left the loop without "
                "loader.close() — see its own error. The timeout is the default process group's "
                "(init_process_group(timeout=...)) or the loader's sync_timeout_s"
            ) from e
        finally:
            if self.stats is not None:
                self.stats.collective_seconds += time.perf_counter() - t0

    def gather(self, obj: Any, step: int) -> list[Any]:
        """Every rank's ``obj`` (``all_gather_object``, pickled), in rank order."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size()
        self.collective(lambda: dist.all_gather_object(out, obj, group=self.group), "all-gather", step)
        return out

    def gather_outcomes(self, local: RoundOutcome, fingerprint: str, digest: str) -> list[tuple[Any, ...]]:
        """Every rank's ``(kind, step, fingerprint, digest, error text)``: one all-gather of 64 bytes per rank,
        and a second one, of the error texts, only when some rank failed."""
        import torch
        import torch.distributed as dist

        mine = torch.from_numpy(encode_outcome(local.kind, local.step, fingerprint, digest))
        parts = [torch.empty_like(mine) for _ in range(self.world_size())]
        self.collective(lambda: dist.all_gather(parts, mine, group=self.group), "all-gather", local.step)
        got = [decode_outcome(p.numpy()) for p in parts]
        texts = [""] * len(got)
        if any(m[0] == ERROR for m in got):
            text = f"{type(local.error).__name__}: {local.error}" if local.error is not None else ""
            self.collective(lambda: dist.all_gather_object(texts, text, group=self.group), "all-gather", local.step)
        return [(*m, t) for m, t in zip(got, texts)]

    def decide(self, got: list[tuple[Any, ...]], local: RoundOutcome, item: Any) -> Any:
        """``item`` when every rank built the same step; ``END`` when every rank's data ended; :data:`QUIT`
        when this rank stopped with its peers; otherwise raises — the same on every rank."""
        step = local.step
        errors = [(r, m) for r, m in enumerate(got) if m[0] == ERROR]
        if errors:
            if local.error is not None:
                raise local.error
            r, m = errors[0]
            raise PlanSyncError(f"rank {r} failed at step {m[1]}: {m[4]}; this rank stops too")
        stopped = [r for r, m in enumerate(got) if m[0] == STOP]
        if stopped:
            if self.stopping.is_set():
                return QUIT
            raise PlanSyncError(f"rank(s) {stopped} stopped iterating at step {step} while this rank continued; {SAME_STEPS}")
        ended = [r for r, m in enumerate(got) if m[0] == END]
        if ended:
            if len(ended) == len(got):
                return END
            more = [r for r in range(len(got)) if r not in ended]
            raise PlanSyncError(
                f"ranks disagree on the epoch's length: rank(s) {ended} reached the end of their data at step {step} "
                f"while rank(s) {more} still have a batch; {self.data_hint}"
            )
        steps = sorted({m[1] for m in got})
        if len(steps) > 1:
            raise PlanSyncError(
                f"ranks are at different steps {steps} (this rank: {step}); load the same state on every rank and "
                "call set_epoch with the same epoch everywhere"
            )
        by_fingerprint = group_ranks([m[2] for m in got])
        if len(by_fingerprint) > 1:
            raise PlanSyncError(f"ranks hold different global batches for step {step} ({describe_groups(by_fingerprint)}): {self.data_hint}")
        by_digest = group_ranks([m[3] for m in got])
        if len(by_digest) > 1:
            raise PlanSyncError(
                f"ranks derived different plans for step {step} ({describe_groups(by_digest)}) from the same global batch: the "
                "Balancer differs across ranks (its config, candidates, cost model, or measured times fed to "
                "Balancer.observe). Build it identically on every rank, or use plan_sync='broadcast' (rank 0 plans for all)"
            )
        return item
