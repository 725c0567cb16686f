"""``hydraulis plan``: the candidate strategy pool for a dataset profile, cluster and model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._common import DEFAULT_TOKENS_PER_STEP, add_job_arguments, add_lengths_arguments, positive_int

if TYPE_CHECKING:  # pragma: no cover - typing only
    from balancer.cost import CostModel
    from balancer.pool import CandidatePool
    from hydraulis.config import JobConfig
    from strategies.layout import ClusterSpec, Layout

    from ._common import LengthInput

HELP = "candidate parallel strategies for a profile, cluster and model"
DESCRIPTION = """\
Generate the pool of candidate parallel strategies (balancer.candidates) that the
per-step selector chooses from: homogeneous layouts and heterogeneous mixes sized to the
length profile, scored on sampled global batches by both balancer stages. Prints the
layouts that fit memory and the expected step time of every candidate; writes the pool
as JSON (load it with balancer.pool.load_candidates or pass it to
`hydraulis simulate --candidates`).

examples:
  hydraulis plan --profile hydraulis-profile/profile.json --cluster 8xH100 --model llama-7b
  hydraulis plan --lengths code_kafka --cluster 64xA100 --model llama-13b --tokens-per-step 4M
  hydraulis plan --lengths code_kafka --cluster 8xcpu --cost-model cost_model.json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_lengths_arguments(p)
    add_job_arguments(p)
    add_plan_arguments(p)
    p.add_argument("--out", default="candidates.json", metavar="FILE", help="pool JSON (default: candidates.json)")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--tokens-per-step", type=positive_int, default=DEFAULT_TOKENS_PER_STEP, metavar="N",
                   help=f"tokens per global batch, e.g. 1M or 524288 (default: {DEFAULT_TOKENS_PER_STEP:,})")
    g.add_argument("--max-length", type=positive_int, metavar="L",
                   help="longest sequence to plan for, tokens (default: the data's longest, capped at the "
                   "largest layout capacity)")
    g.add_argument("--num-candidates", type=positive_int, default=8, metavar="K", help="pool size (default: 8)")
    g.add_argument("--allow-pp", action="store_true", help="also propose pipeline-parallel layouts")
    g.add_argument("--max-cp", type=positive_int, metavar="N", help="largest context-parallel degree")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled batches (default: 0)")


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """How the candidate pool is generated (the planning flags). Tokens are counts."""

    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP
    max_length: int | None = None
    """``None``: the data's longest sequence, capped at the largest layout capacity."""
    num_candidates: int = 8
    allow_pp: bool = False
    max_cp: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PlanOptions":
        return cls(tokens_per_step=args.tokens_per_step, max_length=args.max_length,
                   num_candidates=args.num_candidates, allow_pp=args.allow_pp, max_cp=args.max_cp, seed=args.seed)


@dataclass(frozen=True, kw_only=True)
class Planned:
    """A generated pool and how its max length was chosen."""

    pool: "CandidatePool"
    max_length: int
    """Longest sequence the pool holds, tokens."""
    note: str
    """Why that max length (printed)."""
    capacities: list[tuple["Layout", int]]
    """Every layout that fits memory and its token capacity."""


def generate(lengths_input: "LengthInput", cost: "CostModel", cluster: "ClusterSpec", opts: PlanOptions) -> Planned:
    """Choose the max length and generate the candidate pool."""
    from balancer.pool import generate_candidates

    from ._common import choose_max_length, layout_capacities

    caps = layout_capacities(cluster, cost, allow_pp=opts.allow_pp, max_cp=opts.max_cp)
    max_length, note = choose_max_length(opts.max_length, lengths_input.profile.max_length, caps)
    source = lengths_input.lengths if lengths_input.lengths is not None else lengths_input.profile
    pool = generate_candidates(
        source, cluster, cost, batch_tokens=opts.tokens_per_step, num_candidates=opts.num_candidates,
        max_length=max_length, allow_pp=opts.allow_pp, max_cp=opts.max_cp, seed=opts.seed,
    )
    return Planned(pool=pool, max_length=max_length, note=note, capacities=caps)


def print_header(
    lengths_input: "LengthInput",
    cost: "CostModel",
    cluster: "ClusterSpec",
    job: "JobConfig",
    cost_label: str,
    planned: Planned,
    tokens_per_step: int,
) -> None:
    """Derived numbers at start-up: ranks, model, tokens per step, max length, layouts."""
    from ._common import describe_cluster, fmt_params, fmt_seconds, format_table

    prof = lengths_input.profile
    hw = job.hardware.name if job.hardware is not None else None
    print(f"cluster:         {describe_cluster(cluster, hw)}")
    if job.model is not None and cost.source == "analytic":
        print(f"model:           {job.model.name} ({fmt_params(job.model.num_parameters)} parameters)")
    print(f"cost model:      {cost_label}")
    print(f"data:            {lengths_input.label}: {prof.num_sequences:,} sequences, mean {prof.mean_length:,.0f} "
          f"tokens, p99 {prof.quantiles.get('p99', prof.max_length):,}, max {prof.max_length:,}")
    per_step = tokens_per_step / prof.mean_length
    print(f"tokens per step: {tokens_per_step:,} (≈ {per_step:,.0f} sequences; "
          f"{tokens_per_step / cluster.num_ranks:,.0f} per rank)")
    print(f"max length:      {planned.note}")
    unit = cost.time_unit
    rows = []
    for lay, cap in planned.capacities:
        c = cost.cost(lay)
        rows.append([lay.name, lay.size, f"{cap:,}", fmt_seconds(float(c.seconds(4096)), unit),
                     fmt_seconds(float(c.seconds(32768)), unit)])
    print("\nlayouts that fit memory:")
    print(format_table(["layout", "ranks", "token capacity", "t(4K tokens)", "t(32K tokens)"], rows))


def print_pool(pool: "CandidatePool", tokens_per_step: int, unit: str, cost: "CostModel | None" = None) -> None:
    """The candidate table. A candidate whose largest replica cannot hold the pool's longest
    sequence is marked and never called best: its mean skips the batches it cannot hold."""
    from ._common import fmt_seconds, format_table

    caps = pool.meta.get("capacity")
    if caps is None and cost is not None:  # a pool file from before capacities were recorded
        caps = [max(int(cost.token_capacity(r.layout)) for r in s.replicas) for s in pool.strategies]
    coverage = pool.meta.get("coverage") or [None] * len(pool.strategies)
    holds = [caps is None or int(cap) >= pool.max_length for cap in (caps or [None] * len(pool.strategies))]
    finite = [x for x, ok in zip(pool.expected_seconds, holds) if x is not None and ok]
    best = min(finite) if finite else None
    rows = []
    for i, (strat, exp) in enumerate(zip(pool.strategies, pool.expected_seconds)):
        reps = " + ".join(f"{lay.name}×{n}" for lay, n in sorted(strat.counts().items(), key=lambda kv: -kv[0].size))
        tps = "—" if exp is None or unit != "s" else f"{tokens_per_step / exp:,.0f}"
        longest = "all" if holds[i] else f"≤ {int(caps[i]):,} ✗"  # type: ignore[index]
        if not holds[i]:
            cov = coverage[i]
            total = pool.meta.get("num_sample_batches")
            held = f"{round(cov * total)} of {total} batches" if cov is not None and total else "some batches"
            step = f"{fmt_seconds(exp, unit)} ({held})"
            rel = "cannot hold"
        else:
            step = fmt_seconds(exp, unit)
            rel = "—" if exp is None or best is None else f"{exp / best:.2f}×"
        rows.append([i + 1, strat.name, reps, longest, step, tps, rel])
    print(f"\ncandidates ({len(pool.strategies)} kept of {pool.meta.get('num_generated', '?')} generated; "
          "expected step time = mean over sampled batches):")
    print(format_table(["#", "strategy", "replicas", "sequences held", "expected step", "tokens/s", "vs best"], rows,
                       "rlllrrr"))
    if not all(holds):
        print(f"✗ cannot hold the longest sequence ({pool.max_length:,} tokens): the mean covers only the batches it "
              "can hold, so it is not compared; the per-step selector runs it on steps without longer sequences")


def run(args: argparse.Namespace) -> int:
    from balancer.pool import save_candidates

    from ._common import load_cost_and_cluster, load_lengths

    cost, cluster, job, label = load_cost_and_cluster(args)
    assert cluster is not None
    lengths_input = load_lengths(args)
    planned = generate(lengths_input, cost, cluster, PlanOptions.from_args(args))
    pool = planned.pool
    print_header(lengths_input, cost, cluster, job, label, planned, args.tokens_per_step)
    print_pool(pool, args.tokens_per_step, cost.time_unit, cost)
    pool.meta["job"] = {
        "data": lengths_input.label,
        "cluster": cluster.to_dict(),
        "cost_model": label,
        "tokens_per_step": args.tokens_per_step,
        "max_length": planned.max_length,
    }
    save_candidates(pool, args.out)
    print(f"\nwrote {args.out}")
    return 0
