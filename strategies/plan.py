"""The StepPlan: what every rank does in one optimizer step.

A plan names the parallel strategy of the step and, per replica, the micro-batches as
lists of *sample ids* (dataset indices). It is JSON-serialisable and versioned; its
``digest`` (SHA-256 of the canonical JSON without the measured ``plan_seconds``) lets
ranks check that they agree. Format (DESIGN.md §4)::

    {"version": 1, "step": 17, "strategy": "tp4x1+tp1x4",
     "replicas": [{"ranks": [0,1,2,3], "layout": {"tp": 4, "cp": 1, "pp": 1},
                   "micro_batches": [[812, 44], [3, 901, 77]], "est_seconds": 0.412}, ...],
     "est_step_seconds": 0.415, "lower_bound_seconds": 0.409,
     "global_sequences": 512, "global_tokens": 1048576, "global_loss_tokens": 1047552,
     "solver": "greedy+cpsat", "plan_seconds": 0.006, "digest": "sha256:…"}

A replica with no sequences gets one explicit empty micro-batch ``[]``: it still takes
part in every collective of the step, with zero loss weight, so nothing hangs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Layout, Replica, Strategy

__all__ = ["PLAN_VERSION", "PlanError", "ReplicaPlan", "RankPlan", "StepPlan", "check_plan", "length_of"]

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan breaks one of its invariants (the message says which, and where)."""


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """One replica's share of a step."""

    ranks: tuple[int, ...]
    """Global ranks of the replica, tp fastest, then cp, then pp."""
    layout: Layout
    micro_batches: tuple[tuple[int, ...], ...]
    """Sample ids per micro-batch, in execution order. ``((),)`` = idle replica."""
    est_seconds: float
    """Estimated replica time from the cost model, seconds."""

    def __post_init__(self) -> None:
        # map(int, ...) normalises numpy integers at C speed (this runs for every plan)
        object.__setattr__(self, "ranks", tuple(map(int, self.ranks)))
        object.__setattr__(self, "micro_batches", tuple(tuple(map(int, mb)) for mb in self.micro_batches))
        object.__setattr__(self, "est_seconds", float(self.est_seconds))

    @property
    def replica(self) -> Replica:
        return Replica(self.layout, self.ranks)

    @property
    def sample_ids(self) -> list[int]:
        return [i for mb in self.micro_batches for i in mb]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": list(self.ranks),
            "layout": self.layout.to_dict(),
            "micro_batches": [list(mb) for mb in self.micro_batches],
            "est_seconds": self.est_seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "replica") -> "ReplicaPlan":
        """From JSON, strictly: ids and ranks must be integers (``2.7`` or ``"2"`` is an error, never rounded)."""
        d = _object(d, where, ("ranks", "layout", "micro_batches", "est_seconds"))
        layout = _object(d["layout"], f"{where}.layout", ())
        return cls(
            ranks=tuple(_ints(d["ranks"], f"{where}.ranks")),
            layout=Layout.from_dict({k: _int(v, f"{where}.layout.{k}") for k, v in layout.items()}),
            micro_batches=tuple(
                tuple(_ints(mb, f"{where}.micro_batches[{k}]")) for k, mb in enumerate(_list(d["micro_batches"], f"{where}.micro_batches"))
            ),
            est_seconds=_number(d["est_seconds"], f"{where}.est_seconds"),
        )


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What one rank does in a step: its replica, coordinates and micro-batches."""

    rank: int
    step: int
    strategy: str
    replica_index: int
    ranks: tuple[int, ...]
    layout: Layout
    tp_rank: int
    cp_rank: int
    pp_rank: int
    micro_batches: tuple[tuple[int, ...], ...]
    est_seconds: float
    global_loss_tokens: int

    @property
    def sample_ids(self) -> list[int]:
        return [i for mb in self.micro_batches for i in mb]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A balanced plan for one optimizer step (see module docstring for the JSON form)."""

    step: int
    strategy: str
    replicas: tuple[ReplicaPlan, ...]
    est_step_seconds: float
    lower_bound_seconds: float
    global_sequences: int
    global_tokens: int
    global_loss_tokens: int
    solver: str
    plan_seconds: float = 0.0
    """Wall-clock seconds the planner spent; the only field excluded from the digest."""
    version: int = PLAN_VERSION
    _digest: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is not supported (this library writes {PLAN_VERSION})")

    # -- identity -----------------------------------------------------------------------
    def _canonical(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "step": int(self.step),
            "strategy": self.strategy,
            "replicas": [r.to_dict() for r in self.replicas],
            "est_step_seconds": float(self.est_step_seconds),
            "lower_bound_seconds": float(self.lower_bound_seconds),
            "global_sequences": int(self.global_sequences),
            "global_tokens": int(self.global_tokens),
            "global_loss_tokens": int(self.global_loss_tokens),
            "solver": self.solver,
        }

    def canonical_json(self) -> str:
        """Deterministic JSON of everything but ``plan_seconds`` and ``digest``."""
        return json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of :meth:`canonical_json`; equal on every rank that derived the same plan."""
        if not self._digest:
            h = hashlib.sha256(self.canonical_json().encode()).hexdigest()
            object.__setattr__(self, "_digest", "sha256:" + h)
        return self._digest

    # -- views ----------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return sum(len(r.ranks) for r in self.replicas)

    def strategy_obj(self) -> Strategy:
        """The plan's replicas as a :class:`Strategy` (validates rank coverage)."""
        return Strategy(self.strategy, tuple(r.replica for r in self.replicas))

    def for_rank(self, rank: int) -> RankPlan:
        """This rank's replica, (tp, cp, pp) coordinates and micro-batches."""
        for j, rep in enumerate(self.replicas):
            if rank in rep.ranks:
                tp, cp, pp = rep.replica.coords(rank)
                return RankPlan(
                    rank=rank,
                    step=self.step,
                    strategy=self.strategy,
                    replica_index=j,
                    ranks=rep.ranks,
                    layout=rep.layout,
                    tp_rank=tp,
                    cp_rank=cp,
                    pp_rank=pp,
                    micro_batches=rep.micro_batches,
                    est_seconds=rep.est_seconds,
                    global_loss_tokens=self.global_loss_tokens,
                )
        raise PlanError(
            f"rank {rank} is not in plan for step {self.step} (strategy {self.strategy!r}, "
            f"ranks 0..{self.num_ranks - 1}); was the plan made for a different world size?"
        )

    def sample_ids(self) -> list[int]:
        return [i for rep in self.replicas for i in rep.sample_ids]

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = self._canonical()
        d["plan_seconds"] = float(self.plan_seconds)
        d["digest"] = self.digest
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, separators=None if indent else (",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepPlan":
        """From JSON, strictly: every field present and of its type (raises :class:`PlanError` naming the field)."""
        d = _object(d, "plan", ())
        if d.get("version") != PLAN_VERSION or isinstance(d.get("version"), bool):
            raise PlanError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        d = _object(d, "plan", _PLAN_FIELDS)
        plan = cls(
            step=_int(d["step"], "plan.step"),
            strategy=_str(d["strategy"], "plan.strategy"),
            replicas=tuple(ReplicaPlan.from_dict(r, f"plan.replicas[{j}]") for j, r in enumerate(_list(d["replicas"], "plan.replicas"))),
            est_step_seconds=_number(d["est_step_seconds"], "plan.est_step_seconds"),
            lower_bound_seconds=_number(d["lower_bound_seconds"], "plan.lower_bound_seconds"),
            global_sequences=_int(d["global_sequences"], "plan.global_sequences"),
            global_tokens=_int(d["global_tokens"], "plan.global_tokens"),
            global_loss_tokens=_int(d["global_loss_tokens"], "plan.global_loss_tokens"),
            solver=_str(d["solver"], "plan.solver"),
            plan_seconds=_number(d.get("plan_seconds", 0.0), "plan.plan_seconds"),
            version=PLAN_VERSION,
        )
        want = d.get("digest")
        if want and want != plan.digest:
            raise PlanError(f"plan digest mismatch: file says {want}, content hashes to {plan.digest}")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "StepPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(d)


# -- strict JSON fields -------------------------------------------------------------------------
_PLAN_FIELDS = (
    "step",
    "strategy",
    "replicas",
    "est_step_seconds",
    "lower_bound_seconds",
    "global_sequences",
    "global_tokens",
    "global_loss_tokens",
    "solver",
)


def _object(d: Any, where: str, required: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {type(d).__name__}; is this a StepPlan's JSON (plan.to_json())?")
    missing = [k for k in required if k not in d]
    if missing:
        raise PlanError(f"{where} lacks {missing}; a plan written by StepPlan.to_json() has them")
    return d


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise PlanError(f"{where} must be a JSON list, got {type(v).__name__}")
    return v


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PlanError(f"{where}={v!r} must be an integer (ids, ranks and counts are never rounded)")
    return int(v)


def _ints(v: Any, where: str) -> list[int]:
    return [_int(x, f"{where}[{i}]") for i, x in enumerate(_list(v, where))]


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise PlanError(f"{where}={v!r} must be a finite number of seconds")
    return float(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise PlanError(f"{where}={v!r} must be a string")
    return v


def length_of(lengths: np.ndarray | Mapping[int, int], sid: int) -> int:
    if isinstance(lengths, Mapping):
        if sid not in lengths:
            raise PlanError(f"sample id {sid} has no length")
        return int(lengths[sid])
    if not 0 <= sid < len(lengths):
        raise PlanError(f"sample id {sid} is outside the length table (0..{len(lengths) - 1})")
    return int(lengths[sid])


def check_plan(
    plan: StepPlan,
    lengths: np.ndarray | Sequence[int] | Mapping[int, int],
    *,
    sample_ids: Sequence[int] | np.ndarray | None = None,
    cluster: ClusterSpec | None = None,
    strategy: Strategy | None = None,
) -> None:
    """Check a plan's structural invariants (no cost model needed); raise :class:`PlanError` naming the first broken one.

    * replicas cover ranks ``0..N-1`` exactly once (and match ``strategy`` if given);
    * every sample id appears exactly once (and the set equals ``sample_ids`` if given);
    * totals (``global_sequences``, ``global_tokens``) add up;
    ``lengths`` maps sample id → tokens (an array indexed by id, or a dict). Cost-model
    checks (capacities, estimates) are :func:`balancer.validation.validate`'s.
    """
    if not isinstance(lengths, Mapping):
        lengths = np.asarray(lengths)
    try:
        strat = plan.strategy_obj()
    except ValueError as e:
        raise PlanError(f"plan step {plan.step}: {e}") from None
    if strategy is not None:
        mine = [(r.layout, r.ranks) for r in strat.replicas]
        theirs = [(r.layout, r.ranks) for r in strategy.replicas]
        if mine != theirs:
            raise PlanError(f"plan step {plan.step}: replicas differ from strategy {strategy.name!r}")
    if cluster is not None and strat.num_ranks != cluster.num_ranks:
        raise PlanError(f"plan covers {strat.num_ranks} ranks, cluster has {cluster.num_ranks}")

    seen: dict[int, int] = {}
    total_tokens = 0
    for j, rep in enumerate(plan.replicas):
        if not rep.micro_batches:
            raise PlanError(f"replica {j} has no micro-batch; an idle replica needs one empty micro-batch")
        if len(rep.micro_batches) < rep.layout.pp and rep.sample_ids:
            raise PlanError(
                f"replica {j} ({rep.layout.name}) has {len(rep.micro_batches)} micro-batches, "
                f"fewer than pp={rep.layout.pp}"
            )
        for sid in rep.sample_ids:
            if sid in seen:
                raise PlanError(f"sample id {sid} appears twice (replicas {seen[sid]} and {j})")
            seen[sid] = j
            s = length_of(lengths, sid)
            if s <= 0:
                raise PlanError(f"sample id {sid} has length {s}; lengths must be >= 1 token")
            total_tokens += s
    if sample_ids is not None:
        want = {int(i) for i in np.asarray(sample_ids).ravel()}
        missing = want - set(seen)
        extra = set(seen) - want
        if missing:
            raise PlanError(f"{len(missing)} sample ids missing from the plan, e.g. {sorted(missing)[:5]}")
        if extra:
            raise PlanError(f"{len(extra)} sample ids not in the batch, e.g. {sorted(extra)[:5]}")
    if plan.global_sequences != len(seen):
        raise PlanError(f"global_sequences={plan.global_sequences} but the plan holds {len(seen)} sequences")
    if plan.global_tokens != total_tokens:
        raise PlanError(f"global_tokens={plan.global_tokens} but the sequences sum to {total_tokens} tokens")
