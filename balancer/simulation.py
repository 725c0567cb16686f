"""Step-by-step simulation: the Balancer against the named baselines on one length file.

A seeded sampler shuffles the dataset every epoch and cuts the order into global batches
of about ``tokens_per_step`` tokens (a batch closes before the sequence that would
overflow it; every batch holds at least one sequence; batches never cross an epoch).
Lengths are capped at ``max_length`` first. Every policy plans the same batches, except
one whose sampler orders the epoch itself (``length_grouped``,
:meth:`~balancer.baselines.BaselinePolicy.epoch_order`), which gets its batches cut from
its own order of the same shuffles:

    for each step:   plan = policy.plan(lengths, step=, sample_ids=)   (wall-clock timed)
                     validate(plan)  ·  score = cost model replica times (padding included
                     for padded policies)  ·  record step seconds, tokens, imbalance, bound

``wlb_llm`` delays outlier sequences to later steps; its queue is flushed at the end of
every epoch (not at the last simulated step: what a policy still holds then is not
trained and earns no throughput), and the simulation checks that every policy trained
or still holds exactly the sampled sequences. It also checks the fixed batch size: outside a
flushed step (an epoch's last), a step may train at most ``tokens_per_step`` plus one
``max_length`` sequence and at least half of ``tokens_per_step``; every policy's summary
reports its smallest and largest step (as fractions of the budget) and the steps
outside that range (``batch_size_violations``). Per-step arrays stay in the result
(:class:`PolicyTrace`) so the CLI can plot them; :meth:`SimulationResult.summary_table`
prints the comparison in markdown.

>>> result = simulate(lengths, cluster, cost_model, SimulationConfig(tokens_per_step=2**19),
...                   candidates=candidates)
>>> print(result.summary_table())
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Strategy
from strategies.plan import StepPlan

from .baselines import BASELINES, BaselinePolicy, PeerRefusal, make_baseline, score_plan
from .cost import CostModel
from .validation import validate

__all__ = [
    "BALANCER",
    "BALANCER_LOOKAHEAD",
    "GlobalBatch",
    "PolicyTrace",
    "SimulationConfig",
    "SimulationResult",
    "global_batches",
    "load_jsonl_plans",
    "simulate",
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
        known = (*_BALANCERS, *BASELINES)
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


# ----------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobalBatch:
    """One step's sequences: dataset indices, in sampled order."""

    step: int
    epoch: int
    sample_ids: np.ndarray
    last_in_epoch: bool


def global_batches(
    lengths: np.ndarray,
    tokens_per_step: int,
    seed: int = 0,
    order: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> Iterator[GlobalBatch]:
    """Endless global batches of about ``tokens_per_step`` tokens over shuffled epochs.

    Epoch ``e`` shuffles with ``numpy.random.default_rng([seed, e])``; ``order(lengths,
    shuffle)``, when given, turns the shuffle into a sampler's own order (a permutation).
    A batch takes sequences in that order while they fit the budget (at least one); the
    last batch of an epoch may be short.
    """
    s = np.asarray(lengths, dtype=np.int64)
    if s.size == 0:
        raise ValueError("global_batches: the length table is empty")
    step = 0
    epoch = 0
    while True:
        shuffle = np.random.default_rng([seed, epoch]).permutation(s.size)
        visit = shuffle if order is None else np.asarray(order(s, shuffle), dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(s[visit])])
        start = 0
        while start < s.size:
            end = int(np.searchsorted(cum, cum[start] + tokens_per_step, side="right")) - 1
            end = min(max(end, start + 1), s.size)
            yield GlobalBatch(step=step, epoch=epoch, sample_ids=visit[start:end], last_in_epoch=end == s.size)
            step += 1
            start = end
        epoch += 1


# ----------------------------------------------------------------------------------------
# Traces and results
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _make_balancer(cluster: ClusterSpec, candidates: Sequence[Strategy], cost_model: CostModel, config: Any) -> Any:
    from .selector import Balancer

    return Balancer(cluster, candidates, cost_model, config)


def simulate(
    lengths: np.ndarray | Sequence[int],
    cluster: ClusterSpec,
    cost_model: CostModel,
    config: SimulationConfig,
    *,
    candidates: Sequence[Strategy] | None = None,
    balancer_config: Any = None,
    baseline_strategy: Strategy | None = None,
    lookahead_candidates: Sequence[Strategy] | None = None,
    lookahead_config: Any = None,
) -> SimulationResult:
    """Run ``config.num_steps`` steps of every policy in ``config.policies``.

    ``lengths``: tokens per dataset sample (index = sample id). ``candidates``: the
    Balancer's strategies (required when ``"balancer"`` runs). ``balancer_config``: a
    :class:`~balancer.selector.BalancerConfig`. ``baseline_strategy``: run every baseline
    on this strategy instead of its static layout for ``max_length``.
    ``lookahead_config``: the :class:`~balancer.selector.BalancerConfig` of
    ``"balancer_lookahead"`` (``lookahead_steps ≥ 2``); ``lookahead_candidates``: its pool
    (default ``candidates``). Its plan latency includes its share of the window's
    regrouping (the window's time spread evenly over its steps).
    """
    table = np.asarray(lengths, dtype=np.int64)
    if table.ndim != 1 or table.size == 0:
        raise ValueError(f"simulate: lengths must be a non-empty 1-D array, got shape {table.shape}")
    if table.min() < 1:
        i = int(np.argmin(table))
        raise ValueError(f"simulate: sample {i} has length {int(table[i])}; lengths must be >= 1 token")
    want_balancer = BALANCER in config.policies
    if want_balancer and not candidates:
        raise ValueError("simulate: the 'balancer' policy needs candidates (e.g. balancer.pool.generate_candidates)")

    factories: dict[str, Any] = {}
    max_length = config.max_length
    if want_balancer:
        probe = _make_balancer(cluster, candidates, cost_model, balancer_config)
        max_length = probe.max_sequence_length if max_length is None else max_length
        if max_length > probe.max_sequence_length:
            raise ValueError(
                f"simulate: max_length={max_length} is above the longest sequence any candidate holds "
                f"({probe.max_sequence_length} tokens); lower max_length or add larger candidates"
            )
        factories[BALANCER] = lambda: _make_balancer(cluster, candidates, cost_model, balancer_config)
    la_cands: list[Strategy] = []
    if BALANCER_LOOKAHEAD in config.policies:
        k = int(getattr(lookahead_config, "lookahead_steps", 0) or 0)
        if k < 2:
            raise ValueError(
                "simulate: the 'balancer_lookahead' policy needs lookahead_config=BalancerConfig(lookahead_steps=k) "
                f"with k >= 2, got {lookahead_config!r}"
            )
        la_cands = list(lookahead_candidates or candidates or [])
        if not la_cands:
            raise ValueError("simulate: the 'balancer_lookahead' policy needs candidates (or lookahead_candidates)")
        factories[BALANCER_LOOKAHEAD] = lambda: _make_balancer(cluster, la_cands, cost_model, lookahead_config)
        if max_length is None:
            max_length = factories[BALANCER_LOOKAHEAD]().max_sequence_length
    if max_length is None:
        raise ValueError("simulate: set SimulationConfig.max_length when the Balancer does not run")
    max_length = int(max_length)
    capped = np.minimum(table, max_length)

    strategies: dict[str, str] = {}
    own: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
    for name in config.policies:
        if name in _BALANCERS:
            continue
        kw = {
            "seed": config.seed, "max_length": max_length, "tokens_per_step": config.tokens_per_step,
            **config.baseline_options.get(name, {}),
        }
        first = make_baseline(name, cluster, baseline_strategy, cost_model, **kw)
        if type(first).epoch_order is not BaselinePolicy.epoch_order:  # its sampler orders the epoch
            own[name] = lambda s, perm, p=first: p.epoch_order(s, perm, config.tokens_per_step)
        split = name == "megatron_hybrid_cp" and first.strategy.layouts[0].cp > 1
        strategies[name] = first.strategy.name + (" (cp groups split per step)" if split else "")
        factories[name] = (lambda n=name, k=kw, st=first.strategy: make_baseline(n, cluster, st, cost_model, **k))
    order = [p for p in config.policies]

    def take(batches: Iterator[GlobalBatch]) -> list[GlobalBatch]:
        return [next(batches) for _ in range(config.num_steps)]

    shared = take(global_batches(capped, config.tokens_per_step, config.seed))
    streams = {
        name: take(global_batches(capped, config.tokens_per_step, config.seed, own[name])) if name in own else shared
        for name in order
    }
    window_seconds = np.zeros(config.num_steps)
    if BALANCER_LOOKAHEAD in order:
        if config.warmup:  # compile the window kernels outside the timing
            lookahead_batches(shared[:2], capped, factories[BALANCER_LOOKAHEAD](), config.tokens_per_step)
        streams[BALANCER_LOOKAHEAD], window_seconds = lookahead_batches(
            shared, capped, factories[BALANCER_LOOKAHEAD](), config.tokens_per_step
        )
    if config.warmup:
        for name in order:
            b0 = streams[name][0]
            try:
                factories[name]().plan(capped[b0.sample_ids], step=0, sample_ids=b0.sample_ids)
            except PeerRefusal:  # recorded when the timed loop meets it
                pass
    planners = {name: factories[name]() for name in order}
    traces = {name: PolicyTrace.empty(name, config.num_steps, config.tokens_per_step, max_length) for name in order}
    trained: dict[str, list[np.ndarray]] = {name: [] for name in order}
    refusals: dict[str, tuple[str, list[int]]] = {}
    dump = Path(config.dump_plans).open("w") if config.dump_plans else None
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_steps * len(order), desc="simulate", unit="plan")
    try:
        for k in range(config.num_steps):
            for name in order:
                b = streams[name][k]
                flush = b.last_in_epoch
                seq = capped[b.sample_ids]
                planner = planners[name]
                t0 = time.perf_counter()
                if isinstance(planner, BaselinePolicy):
                    try:
                        plan = planner.plan(seq, step=b.step, sample_ids=b.sample_ids, flush=flush)
                    except PeerRefusal as err:  # the real system fails here too: report, do not score
                        traces[name].refused[b.step] = True
                        refusals.setdefault(name, (str(err), []))[1].append(b.step)
                        continue
                else:
                    plan = planner.plan(seq, step=b.step, sample_ids=b.sample_ids)
                elapsed = time.perf_counter() - t0 + (window_seconds[k] if name == BALANCER_LOOKAHEAD else 0.0)
                _record(traces[name], b.step, plan, planner, capped, cost_model, cluster, elapsed, config.validate)
                traces[name].flushed[b.step] = flush
                trained[name].append(np.asarray(plan.sample_ids(), dtype=np.int64))
                if dump is not None:
                    dump.write(json.dumps({"policy": name, "step": b.step, "plan": plan.to_dict()}) + "\n")
                if bar is not None:
                    bar.update(1)
    finally:
        if dump is not None:
            dump.close()
        if bar is not None:
            bar.close()

    refused = {
        name: f"{len(steps)} of {config.num_steps} steps (step {', '.join(map(str, steps[:5]))}"
        f"{', …' if len(steps) > 5 else ''}): {why}"
        for name, (why, steps) in refusals.items()
    }
    for name in traces:
        kept = [b.sample_ids for b in streams[name] if not traces[name].refused[b.step]]  # a refused batch trains nothing
        sampled = np.sort(np.concatenate([np.zeros(0, np.int64), *kept]))
        held = planners[name].held() if isinstance(planners[name], BaselinePolicy) else np.zeros(0, np.int64)
        got = np.sort(np.concatenate([*trained[name], held]))
        if got.shape != sampled.shape or not np.array_equal(got, sampled):
            raise RuntimeError(
                f"simulate: policy {name!r} trained {got.size - held.size} sequences and holds {held.size}, but "
                f"{sampled.size} were sampled (a sequence was lost or duplicated)"
            )
    return SimulationResult(
        config=config,
        traces=traces,
        max_length=max_length,
        num_ranks=cluster.num_ranks,
        cost_model=repr(cost_model),
        baseline_strategies=strategies,
        num_candidates=len(candidates) if (want_balancer and candidates) else 0,
        refused=refused,
        epoch_ends=tuple(b.step for b in shared if b.last_in_epoch),
        num_lookahead_candidates=len(la_cands) if BALANCER_LOOKAHEAD in order else 0,
    )


def lookahead_batches(
    steps: Sequence[GlobalBatch], lengths: np.ndarray, balancer: Any, tokens_per_step: int
) -> tuple[list[GlobalBatch], np.ndarray]:
    """``steps`` regrouped window by window as the loader does (windows of
    ``balancer.config.lookahead_steps`` steps, aligned to each epoch's first step, never
    crossing an epoch or the end of ``steps``), and the regrouping seconds charged to every
    step (its window's wall time over its steps)."""
    from .lookahead import WindowPlanner

    planner = WindowPlanner.from_balancer(balancer)
    k = int(balancer.config.lookahead_steps)
    out: list[GlobalBatch] = []
    seconds = np.zeros(len(steps))
    first_of_epoch: dict[int, int] = {}
    i = 0
    while i < len(steps):
        epoch = steps[i].epoch
        first = first_of_epoch.setdefault(epoch, steps[i].step)
        end = i + 1
        while end < len(steps) and steps[end].epoch == epoch and (steps[end].step - first) % k:
            end += 1
        window = steps[i:end]
        ids = np.concatenate([b.sample_ids for b in window])
        step_of = np.repeat(np.arange(len(window)), [b.sample_ids.size for b in window])
        t0 = time.perf_counter()
        plan = planner.plan(lengths[ids], step_of, tokens_per_step=tokens_per_step, num_steps=len(window))
        seconds[i:end] = (time.perf_counter() - t0) / len(window)
        for b, pos in zip(window, plan.steps()):
            out.append(GlobalBatch(step=b.step, epoch=b.epoch, sample_ids=ids[pos], last_in_epoch=b.last_in_epoch))
        i = end
    return out, seconds


def _record(
    trace: PolicyTrace,
    step: int,
    plan: StepPlan,
    planner: Any,
    lengths: np.ndarray,
    cost_model: CostModel,
    cluster: ClusterSpec,
    elapsed: float,
    check: bool,
) -> None:
    plan_cluster = getattr(planner, "cluster", cluster)
    if not isinstance(plan_cluster, ClusterSpec):
        plan_cluster = cluster
    if check:
        validate(plan, lengths, cost_model=cost_model, cluster=plan_cluster)
    pads = isinstance(planner, BaselinePolicy) and planner.pads
    score = score_plan(plan, lengths, cost_model, plan_cluster, padded=pads)
    trace.step_seconds[step] = score.step_seconds
    trace.tokens[step] = score.tokens
    trace.sequences[step] = plan.global_sequences
    trace.imbalance[step] = score.imbalance
    trace.lower_bound[step] = plan.lower_bound_seconds
    trace.padding_tokens[step] = score.padding_tokens
    trace.plan_seconds[step] = elapsed
    trace.strategy[step] = plan.strategy


def summary_rows(result: SimulationResult) -> list[dict[str, Any]]:
    """One flat dict per policy (name + :meth:`PolicyTrace.summary`), for tables and JSON."""
    return [{"policy": name, **tr.summary()} for name, tr in result.traces.items()]


def load_jsonl_plans(path: str | Path) -> Iterator[tuple[str, int, StepPlan]]:
    """Read back a ``dump_plans`` file: ``(policy, step, plan)`` per line."""
    with Path(path).open() as f:
        for line in f:
            d: Mapping[str, Any] = json.loads(line)
            yield str(d["policy"]), int(d["step"]), StepPlan.from_dict(d["plan"])
