"""What a simulation is asked (:class:`SimulationConfig`) and records: per-step traces, the result, its tables.

:func:`balancer.simulation.simulate` fills a :class:`PolicyTrace` per policy (arrays
indexed by step) and returns a :class:`SimulationResult`, which compares them
(:meth:`SimulationResult.summary_table`, :meth:`SimulationResult.speedup`) and writes JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from strategies.plan import StepPlan

from .baselines import BASELINES

__all__ = [
    "BALANCER",
    "SimulationConfig",
    "BALANCER_LOOKAHEAD",
    "PolicyTrace",
    "SimulationResult",
    "load_jsonl_plans",
    "summary_rows",
]

BALANCER = "balancer"
"""Policy name of the :class:`~balancer.selector.Balancer` (all candidates) in results."""
BALANCER_LOOKAHEAD = "balancer_lookahead"
"""The Balancer with bounded look-ahead (``BalancerConfig.lookahead_steps``): each window of
that many batches is regrouped by :class:`balancer.lookahead.WindowPlanner` first."""
_BALANCERS = (BALANCER, BALANCER_LOOKAHEAD)


@dataclass(kw_only=True)
class SimulationConfig:
    """What to simulate. Tokens are counts, times seconds."""

    tokens_per_step: int
    """Token budget of one global batch (e.g. 524288)."""
    num_steps: int = 20
    """Optimizer steps to simulate."""
    max_length: int | None = None
    """Cap applied to every sequence, tokens; ``None`` = the Balancer's longest
    supported sequence (``Balancer.max_sequence_length``); required without the Balancer."""
    seed: int = 0
    """Seed of the sampler's shuffles and of every policy's randomness."""
    policies: tuple[str, ...] = (BALANCER, *BASELINES)
    """Policies to run: ``"balancer"``, ``"balancer_lookahead"`` (needs ``lookahead_config``
    in :func:`simulate`) and/or names from :data:`balancer.baselines.BASELINES`."""
    baseline_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra keywords per baseline name (e.g. ``{"padded": {"micro_batch_size": 2}}``)."""
    validate: bool = True
    """Run :func:`strategies.plan.validate` (with the cost model) on every plan."""
    warmup: bool = True
    """Plan the first batch once with throw-away planners before timing (JIT compilation)."""
    dump_plans: str | None = None
    """Write every plan as a JSON line ``{"policy", "step", "plan"}`` to this path."""
    progress: bool = False
    """Show a tqdm progress bar over steps."""

    def __post_init__(self) -> None:
        for name in ("tokens_per_step", "num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"SimulationConfig: {name}={v!r} must be an integer >= 1")
        if self.max_length is not None and (isinstance(self.max_length, bool) or int(self.max_length) < 1):
            raise ValueError(f"SimulationConfig: max_length={self.max_length!r} must be >= 1 token or None")
        self.policies = tuple(self.policies)
        if not self.policies:
            raise ValueError("SimulationConfig: policies is empty; name at least one (e.g. 'balancer')")
        known = (BALANCER, BALANCER_LOOKAHEAD, *BASELINES)
        for p in self.policies:
            if p not in known:
                raise ValueError(f"SimulationConfig: unknown policy {p!r}; choose from {', '.join(known)}")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"SimulationConfig: policies {self.policies} name one policy twice")
        for name in self.baseline_options:
            if name not in BASELINES:
                raise ValueError(f"SimulationConfig: baseline_options names unknown baseline {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PolicyTrace:
    """Per-step record of one policy (arrays indexed by step)."""

    name: str
    step_seconds: np.ndarray
    """Estimated step time (slowest replica), seconds; padding included for padded policies."""
    tokens: np.ndarray
    """Real tokens trained in the step (``wlb_llm`` may move tokens between steps)."""
    sequences: np.ndarray
    """Sequences trained in the step."""
    imbalance: np.ndarray
    """Slowest over mean replica time."""
    lower_bound: np.ndarray
    """The plan's lower bound on its step time, seconds."""
    padding_tokens: np.ndarray
    """Pad tokens processed in the step."""
    plan_seconds: np.ndarray
    """Wall-clock planning latency, seconds."""
    strategy: list[str]
    """Strategy name per step."""
    flushed: np.ndarray
    """Whether the step ended an epoch: a delaying policy trained all it held."""
    refused: np.ndarray
    """Whether the policy's real system refused the step's batch (not scored, not counted)."""
    budget: int = 0
    """The step's token budget (``tokens_per_step``)."""
    longest: int = 0
    """Longest allowed sequence (``max_length``), tokens: the budget's slack."""

    @classmethod
    def empty(cls, name: str, num_steps: int, budget: int = 0, longest: int = 0) -> "PolicyTrace":
        f = lambda dt: np.zeros(num_steps, dtype=dt)  # noqa: E731
        return cls(
            name=name, step_seconds=f(np.float64), tokens=f(np.int64), sequences=f(np.int64),
            imbalance=f(np.float64), lower_bound=f(np.float64), padding_tokens=f(np.int64),
            plan_seconds=f(np.float64), strategy=[""] * num_steps, flushed=f(bool), refused=f(bool), budget=budget,
            longest=longest,
        )

    def batch_size(self) -> dict[str, float]:
        """The fixed-batch-size check over the steps that did not flush.

        ``step_tokens_min`` / ``step_tokens_max``: the smallest and largest step as a
        fraction of the budget; ``batch_size_violations``: steps under half the budget or
        over the budget plus one longest sequence.
        """
        if self.budget <= 0:
            return {"step_tokens_min": math.nan, "step_tokens_max": math.nan, "batch_size_violations": 0}
        tok = self.tokens[~self.flushed & ~self.refused]
        if tok.size == 0:
            return {"step_tokens_min": math.nan, "step_tokens_max": math.nan, "batch_size_violations": 0}
        bad = (2 * tok < self.budget) | (tok > self.budget + self.longest)
        return {
            "step_tokens_min": float(tok.min()) / self.budget,
            "step_tokens_max": float(tok.max()) / self.budget,
            "batch_size_violations": int(bad.sum()),
        }

    @property
    def estimate_over_bound(self) -> np.ndarray:
        """Per-step ``step_seconds / lower_bound`` (nan for an empty step)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.lower_bound > 0, self.step_seconds / self.lower_bound, np.nan)

    def summary(self) -> dict[str, float]:
        ok = ~self.refused
        total_s = float(self.step_seconds.sum())
        total_tok = int(self.tokens.sum())
        pad = int(self.padding_tokens.sum())
        ratio = self.estimate_over_bound[ok]
        ms = self.plan_seconds[ok] * 1e3 if ok.any() else np.zeros(1)
        return {
            "total_seconds": total_s,
            "mean_step_seconds": float(self.step_seconds[ok].mean()) if ok.any() else math.nan,
            "tokens": total_tok,
            "tokens_per_second": total_tok / total_s if total_s > 0 else 0.0,
            "mean_imbalance": float(self.imbalance[ok].mean()) if ok.any() else math.nan,
            "median_estimate_over_bound": float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else math.nan,
            "padding_ratio": pad / (total_tok + pad) if total_tok + pad else 0.0,
            "plan_ms_median": float(np.median(ms)),
            "plan_ms_p99": float(np.percentile(ms, 99)),
            "strategies_used": len({st for st, r in zip(self.strategy, self.refused) if not r}),
            "refused_steps": int(self.refused.sum()),
            **self.batch_size(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "steps": {
                "step_seconds": self.step_seconds.tolist(),
                "tokens": self.tokens.tolist(),
                "sequences": self.sequences.tolist(),
                "imbalance": self.imbalance.tolist(),
                "lower_bound": self.lower_bound.tolist(),
                "padding_tokens": self.padding_tokens.tolist(),
                "plan_seconds": self.plan_seconds.tolist(),
                "strategy": list(self.strategy),
                "flushed": self.flushed.tolist(),
                "refused": self.refused.tolist(),
            },
        }


@dataclass
class SimulationResult:
    """Traces of every policy plus what was simulated."""

    config: SimulationConfig
    traces: dict[str, PolicyTrace]
    max_length: int
    """The cap actually applied, tokens."""
    num_ranks: int
    cost_model: str
    """Cost model source and layouts, as ``repr``."""
    baseline_strategies: dict[str, str]
    """Fixed strategy of every baseline (the static layout unless given)."""
    num_candidates: int
    """Candidate strategies of the Balancer (0 when it did not run)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Baselines whose real system refused a batch (e.g. Megatron's ``DpBalancedScheduler``
    on a batch it cannot cut into R groups): name → the steps and the first reason. Those
    steps are left out of the policy's trace (``PolicyTrace.refused``) and totals."""
    epoch_ends: tuple[int, ...] = ()
    """Steps that close an epoch of the shared global batches: they hold only the epoch's remaining
    sequences (a short step). A policy with its own epoch order flags its own in ``PolicyTrace.flushed``."""
    num_lookahead_candidates: int = 0
    """Candidate strategies of ``balancer_lookahead`` (0 when it did not run)."""

    def speedup(self, reference: str = BALANCER) -> dict[str, float]:
        """Throughput of ``reference`` over every other policy's (``> 1`` = reference faster)."""
        ref = self.traces[reference].summary()["tokens_per_second"]
        out = {}
        for name, tr in self.traces.items():
            if name != reference:
                tps = tr.summary()["tokens_per_second"]
                out[name] = ref / tps if tps > 0 else math.inf
        return out

    def best_baseline(self) -> str | None:
        """The baseline with the highest throughput over every step (``None`` if only the
        Balancer ran). A baseline whose real system refused some batch ran on fewer steps
        than the others, so it is not compared (unless every baseline refused one)."""
        names = [n for n in self.traces if n not in _BALANCERS]
        complete = [n for n in names if not self.traces[n].refused.any()]
        if not names:
            return None
        return max(complete or names, key=lambda n: self.traces[n].summary()["tokens_per_second"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config.to_dict(),
            "max_length": self.max_length,
            "num_ranks": self.num_ranks,
            "cost_model": self.cost_model,
            "baseline_strategies": dict(self.baseline_strategies),
            "num_candidates": self.num_candidates,
            "epoch_ends": list(self.epoch_ends),
            "policies": {name: tr.to_dict() for name, tr in self.traces.items()},
            "refused": dict(self.refused),
        }
        if BALANCER in self.traces and len(self.traces) > 1:
            out["speedup_vs"] = self.speedup()
            out["best_baseline"] = self.best_baseline()
        return out

    def summary_table(self) -> str:
        """Markdown table: one row per policy."""
        head = (
            "| policy | strategy | mean step s | tokens/s | imbalance | est/bound | padding | "
            "plan ms (median / p99) | step tokens / budget | balancer speedup |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
        )
        speed = self.speedup() if BALANCER in self.traces else {}
        rows = []
        for name, tr in self.traces.items():
            s = tr.summary()
            pool = self.num_lookahead_candidates if name == BALANCER_LOOKAHEAD else self.num_candidates
            strat = self.baseline_strategies.get(name) or f"{s['strategies_used']} of {pool}"
            up = "—" if name == BALANCER else (f"{speed[name]:.2f}×" if name in speed else "")
            size = f"{s['step_tokens_min']:.2f}–{s['step_tokens_max']:.2f}" + (
                f" ✗ {s['batch_size_violations']}" if s["batch_size_violations"] else " ✓"
            )
            if s["refused_steps"] == tr.refused.size:
                rows.append(f"| {name} | {strat} | refused every step |" + " |" * 7)
                continue
            if s["refused_steps"]:
                up += f" (on {tr.refused.size - s['refused_steps']} of {tr.refused.size} steps)"
            if name == BALANCER_LOOKAHEAD and name in speed:  # its throughput over the Balancer's
                up = f"{1.0 / speed[name]:.2f}× faster"
            rows.append(
                f"| {name} | {strat} | {s['mean_step_seconds']:.4g} | {s['tokens_per_second']:,.0f} | "
                f"{s['mean_imbalance']:.3f} | {s['median_estimate_over_bound']:.3f} | {s['padding_ratio']:.1%} | "
                f"{s['plan_ms_median']:.2f} / {s['plan_ms_p99']:.2f} | {size} | {up} |"
            )
        notes = [f"* `{name}` refused {why}" for name, why in self.refused.items()]
        return head + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def summary_rows(result: SimulationResult) -> list[dict[str, Any]]:
    """One flat dict per policy (name + :meth:`PolicyTrace.summary`), for tables and JSON."""
    return [{"policy": name, **tr.summary()} for name, tr in result.traces.items()]


def load_jsonl_plans(path: str | Path) -> Iterator[tuple[str, int, StepPlan]]:
    """Read back a ``dump_plans`` file: ``(policy, step, plan)`` per line."""
    with Path(path).open() as f:
        for line in f:
            d: Mapping[str, Any] = json.loads(line)
            yield str(d["policy"]), int(d["step"]), StepPlan.from_dict(d["plan"])
