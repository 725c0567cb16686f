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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Strategy
from strategies.plan import StepPlan

from .baselines import BaselinePolicy, PeerRefusal, make_baseline, score_plan
from .cost import CostModel
from .simulation_result import (
    BALANCER,
    BALANCER_LOOKAHEAD,
    PolicyTrace,
    SimulationConfig,
    SimulationResult,
    load_jsonl_plans,
    summary_rows,
)
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
        if name in (BALANCER, BALANCER_LOOKAHEAD):
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
