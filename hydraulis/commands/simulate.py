"""``hydraulis simulate``: the balancer against every baseline, step by step, on one cost model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import add_job_arguments, add_lengths_arguments, positive_int
from .plan import add_plan_arguments

if TYPE_CHECKING:  # pragma: no cover - typing only
    from balancer.cost import CostModel
    from balancer.pool import CandidatePool
    from balancer.simulation import SimulationResult
    from strategies.layout import ClusterSpec

    from ._common import LengthInput

HELP = "the balancer against every baseline, step by step (table, plot, JSON)"
DESCRIPTION = """\
Plan the same global batches with the Balancer (all candidates, per-step choice) and with
every baseline policy (padded, length-grouped, multipack, best-fit, Megatron dp-balanced
and hybrid-cp, WLB-LLM, Hydraulis random restart — see docs/baselines.md), score every
plan with the cost model, and compare estimated step times, throughput and imbalance.
Writes OUT/simulation.json and OUT/simulation.png.

Lengths come from a length file (--lengths) or are drawn from a profile (--profile).
Candidates are generated like `hydraulis plan` unless --candidates FILE is given.

examples:
  hydraulis simulate --lengths code_kafka --cluster 16xH100 --model llama-7b
  hydraulis simulate --profile profile.json --cluster 64xA100 --model llama-13b --steps 50
  hydraulis simulate --lengths code_kafka --cluster 8xH100 --cost-model cost.json --policies balancer,multipack"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_lengths_arguments(p)
    add_job_arguments(p)
    add_plan_arguments(p)
    g = p.add_argument_group("simulation")
    g.add_argument("--steps", type=positive_int, default=20, metavar="N", help="optimizer steps (default: 20)")
    g.add_argument("--candidates", metavar="FILE", help="candidate pool JSON from `hydraulis plan`")
    g.add_argument("--policies", metavar="LIST",
                   help="comma-separated policies (default: balancer and every baseline)")
    g.add_argument("--out", default="hydraulis-simulation", metavar="DIR",
                   help="output folder (default: hydraulis-simulation)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plot")


def parse_policies(text: str | None) -> tuple[str, ...] | None:
    from balancer.baselines import BASELINES
    from balancer.simulation import BALANCER

    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = (BALANCER, *BASELINES)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown policy {n!r} in --policies; choose from {', '.join(known)}")
    if not names:
        raise ValueError(f"--policies is empty; choose from {', '.join(known)}")
    return names


def headline(result: "SimulationResult") -> list[str]:
    """Lines that say what the balancer gains over the best baseline."""
    from balancer.simulation import BALANCER

    if BALANCER not in result.traces or len(result.traces) < 2:
        return []
    best = result.best_baseline()
    assert best is not None
    speedup = result.speedup()
    bal = result.traces[BALANCER].summary()
    ref = result.traces[best].summary()
    worst = max(speedup.items(), key=lambda kv: kv[1])
    return [
        f"balancer: {bal['tokens_per_second']:,.0f} tokens/s, mean step {bal['mean_step_seconds']:.4g}, "
        f"imbalance {bal['mean_imbalance']:.3f}",
        f"best baseline {best}: {ref['tokens_per_second']:,.0f} tokens/s, mean step {ref['mean_step_seconds']:.4g}, "
        f"imbalance {ref['mean_imbalance']:.3f}",
        f"estimated speedup over the best baseline: {speedup[best]:.2f}× (over {worst[0]}: {worst[1]:.2f}×)",
    ]


def describe_steps(result: "SimulationResult", tokens_per_step: int, data_label: str) -> list[str]:
    """What was simulated, in real tokens: the budget is an upper bound, epoch ends are short."""
    import numpy as np

    trace = next(iter(result.traces.values()))
    tokens = trace.tokens.astype(np.int64)
    n = tokens.size
    ends = [s for s in result.epoch_ends if s < n]
    full = np.setdiff1d(np.arange(n), ends)
    lines = [
        f"simulated {n} steps of at most {tokens_per_step:,} tokens: {tokens.mean():,.0f} tokens per step on "
        f"average ({tokens.min():,}–{tokens.max():,}); a step closes before the sequence that would overflow "
        "the budget"
    ]
    if ends:
        short = tokens[ends]
        where = ", ".join(str(s) for s in ends[:8]) + (" …" if len(ends) > 8 else "")
        lines.append(
            f"{len(ends)} of them end an epoch of {data_label} (steps {where}) and hold only the epoch's remaining "
            f"{short.mean():,.0f} tokens on average, so their step times dip; the other {full.size} average "
            f"{tokens[full].mean():,.0f} tokens" if full.size else
            f"every step ends an epoch of {data_label}: the data is smaller than one step's budget"
        )
    return lines


def run_simulation(
    lengths_input: "LengthInput",
    cost: "CostModel",
    cluster: "ClusterSpec",
    pool: "CandidatePool",
    out: Path,
    *,
    tokens_per_step: int,
    steps: int,
    max_length: int,
    seed: int = 0,
    policies: tuple[str, ...] | None = None,
    plots: bool = True,
) -> "SimulationResult":
    """Simulate every policy, write ``out/simulation.json`` (and ``simulation.png``)."""
    import json

    from balancer.simulation import SimulationConfig, simulate
    from hydraulis.plots import plot_simulation

    n = max(lengths_input.profile.num_sequences, 1)
    lengths = lengths_input.sample(min(n, 1_000_000), seed=seed)
    extra = {"policies": policies} if policies else {}
    cfg = SimulationConfig(tokens_per_step=tokens_per_step, num_steps=steps, max_length=max_length, seed=seed, **extra)
    result = simulate(lengths, cluster, cost, cfg, candidates=list(pool.strategies))
    data = result.to_dict()
    data["data"] = lengths_input.label
    data["time_unit"] = cost.time_unit
    (out / "simulation.json").write_text(json.dumps(data, indent=1) + "\n")
    if plots:
        plot_simulation(result, out / "simulation.png", unit=cost.time_unit)
    return result


def run(args: argparse.Namespace) -> int:
    from balancer.pool import load_candidates

    from ._common import choose_max_length, layout_capacities, load_cost_and_cluster, load_lengths, output_dir
    from .plan import Planned, PlanOptions, generate, print_header, print_pool

    cost, cluster, job, label = load_cost_and_cluster(args)
    assert cluster is not None
    policies = parse_policies(args.policies)  # fail before the expensive part
    lengths_input = load_lengths(args)
    out = output_dir(args.out)
    opts = PlanOptions.from_args(args)
    if args.candidates:
        pool = load_candidates(args.candidates, cluster)
        caps = layout_capacities(cluster, cost, allow_pp=opts.allow_pp, max_cp=opts.max_cp)
        max_length, note = choose_max_length(args.max_length or pool.max_length, lengths_input.profile.max_length, caps)
        planned = Planned(pool=pool, max_length=max_length, note=note, capacities=caps)
    else:
        planned = generate(lengths_input, cost, cluster, opts)
    print_header(lengths_input, cost, cluster, job, label, planned, args.tokens_per_step)
    print_pool(planned.pool, args.tokens_per_step, cost.time_unit, cost)
    result = run_simulation(
        lengths_input, cost, cluster, planned.pool, out, tokens_per_step=args.tokens_per_step, steps=args.steps,
        max_length=planned.max_length, seed=args.seed, policies=policies, plots=not args.no_plots,
    )
    print()
    for line in describe_steps(result, args.tokens_per_step, lengths_input.label):
        print(line)
    print(f"(times in {cost.time_unit})")
    print(result.summary_table())
    for line in headline(result):
        print(line)
    written = [out / "simulation.json"] + ([] if args.no_plots else [out / "simulation.png"])
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0
