"""Lockstep benchmark: what FSDP2's reshard mode costs in step time (cost-model estimates).

    python benchmarks/lockstep.py [--lengths PATH]... [--scenario NAME]... [--steps N] [--quick]

The FSDP2 integration (docs/integrations/fsdp2.md) has two modes. *Accumulate* (default):
every rank runs its own micro-batches back to back, the step takes ``max_r Σ_k T(r, k)``
(*free*, what the planner minimises) and parameters stay unsharded through the step.
*Reshard*: FSDP2 reshards and reduce-scatters after every micro-batch, so every rank runs
the step's largest count ``K`` (one-token zero-loss pads fill in) and micro-batch ``k``
ends when the slowest rank's ``k``-th does — ``Σ_k max_r T(r, k)``
(:func:`balancer.lockstep.lockstep_price`).

For every scenario × length file, the same global batches (``balancer.simulation.
global_batches``) are planned by the Balancer on the one FSDP2 strategy (``tp1`` on every
rank) and by ``multipack`` (OpenChat's sampler: one packed row per rank per micro-step,
the lockstep packer users run today), and each plan is priced free and in lockstep with
the micro-batches in plan order (what ``StepBatch.lockstep_micro_batches()`` keeps: the
Balancer lists a ``pp = 1`` replica's micro-batches longest first by its cost model),
longest first by tokens (a naive proxy), and longest first by estimated seconds (what
``lockstep_micro_batches(cost=...)`` does). Step times are summed over the steps; ratios are
side by side on the same batches, so machine load does not enter (no wall clock is
measured — plan latency is ``benchmarks/planner.py``'s business).

Scenarios: the planner benchmark's 7B settings on 8 and 64 data-parallel ranks —
``CostModel.analytic(llama-7b, a100-80g, zero_stage=3)`` (FSDP2 shards everything), the
least activation recompute with which ``tp1`` holds the longest sequence (``selective``
for 16K, ``full`` for 32K), 524,288 tokens per step on 8 ranks and 2,097,152 on 64.
What is not modelled: the extra all-gathers and reduce-scatters of the reshard mode (one
per micro-batch instead of two per step), which FSDP2 overlaps with compute.

Writes ``benchmarks/results/lockstep.json`` and ``lockstep.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

from balancer.baselines import make_baseline  # noqa: E402
from balancer.cost import CostModel  # noqa: E402
from balancer.data import bundled_path, read_lengths  # noqa: E402
from balancer.lockstep import LOCKSTEP_ORDERS, lockstep_price  # noqa: E402
from balancer.selector import Balancer  # noqa: E402
from balancer.simulation import global_batches  # noqa: E402
from balancer.specs import model_preset  # noqa: E402
from strategies.layout import ClusterSpec, Layout, Strategy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SETS = ("pretrain_wikipedia_flexsp_100k", "code_kafka", "books_eltec_eng", "sft_alpaca_eval_outputs")
"""The planner benchmark's default sets."""
HARDWARE = "a100-80g"
POLICIES = ("balancer", "multipack")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    num_ranks: int
    max_length: int
    """Sequences are capped here, tokens."""
    tokens_per_step: int
    recompute: str
    """Activation recompute of the 7B model (the least with which tp1 holds ``max_length``)."""


SCENARIOS = (
    Scenario(name="7b-8gpu-16k", num_ranks=8, max_length=16_384, tokens_per_step=524_288, recompute="selective"),
    Scenario(name="7b-64gpu-16k", num_ranks=64, max_length=16_384, tokens_per_step=2_097_152, recompute="selective"),
    Scenario(name="7b-8gpu-32k", num_ranks=8, max_length=32_768, tokens_per_step=524_288, recompute="full"),
    Scenario(name="7b-64gpu-32k", num_ranks=64, max_length=32_768, tokens_per_step=2_097_152, recompute="full"),
)


def cost_model(scn: Scenario) -> CostModel:
    spec = replace(model_preset("llama-7b"), activation_recompute=scn.recompute)
    cost = CostModel.analytic(spec, HARDWARE, zero_stage=3, num_ranks=scn.num_ranks)
    cap = cost.cost(Layout(1)).token_capacity
    if cap < scn.max_length:
        raise SystemExit(f"{scn.name}: tp1 holds {cap:,} tokens < max_length {scn.max_length:,}; raise recompute")
    return cost


def run(scn: Scenario, lengths: np.ndarray, steps: int, seed: int) -> dict[str, Any]:
    """Σ over ``steps`` global batches of each policy's free and lockstep step times (seconds)."""
    cost = cost_model(scn)
    capped = np.minimum(lengths, scn.max_length).astype(np.int64)
    cluster = ClusterSpec(num_ranks=scn.num_ranks, ranks_per_node=8)
    tp1 = Strategy.homogeneous(Layout(1), scn.num_ranks)
    planners = {
        "balancer": Balancer(cluster, [tp1], cost),
        "multipack": make_baseline("multipack", cluster, tp1, cost, seed=seed, max_length=scn.max_length,
                                   tokens_per_step=scn.tokens_per_step),
    }
    sums = {p: {"free": 0.0, **{o: 0.0 for o in LOCKSTEP_ORDERS}, "micro_batches": 0, "pads": 0} for p in POLICIES}
    uneven = 0
    batches = global_batches(capped, scn.tokens_per_step, seed)
    for _ in range(steps):
        b = next(batches)
        seq = capped[b.sample_ids]
        for name, planner in planners.items():
            if name == "balancer":
                plan = planner.plan(seq, step=b.step, sample_ids=b.sample_ids)
            else:
                plan = planner.plan(seq, step=b.step, sample_ids=b.sample_ids, flush=b.last_in_epoch)
            price = lockstep_price(plan, capped, cost)
            acc = sums[name]
            acc["free"] += price.free
            for order, seconds in price.lockstep.items():
                acc[order] += seconds
            acc["micro_batches"] += price.micro_batches
            acc["pads"] += price.pads
            if name == "balancer":
                uneven += len({len(r.micro_batches) for r in plan.replicas}) > 1
    return {"scenario": asdict(scn), "steps": steps, "uneven_steps": uneven, "seconds": sums,
            "tp1_token_capacity": cost.cost(Layout(1)).token_capacity}


def ratios(rec: dict[str, Any]) -> dict[str, float]:
    """The table's ratios: lockstep over free (≥ 1: the price) and the Balancer's speedup over multipack."""
    bal, mp = rec["seconds"]["balancer"], rec["seconds"]["multipack"]
    return {
        "plan_over_free": bal["plan"] / bal["free"],
        "tokens_over_free": bal["tokens"] / bal["free"],
        "seconds_over_free": bal["seconds"] / bal["free"],
        "vs_multipack_lockstep": mp["plan"] / bal["seconds"],
        "vs_multipack_lockstep_sorted": mp["seconds"] / bal["seconds"],
        "free_vs_multipack_free": mp["free"] / bal["free"],
    }


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Lockstep benchmark: FSDP2 reshard mode's step time",
        "",
        f"`python benchmarks/lockstep.py` — {meta['steps']} steps per row, cost-model estimates "
        f"(`llama-7b` on `{HARDWARE}`, zero_stage=3, tp1 on every rank). Free = `max_r Σ_k T(r,k)` (accumulate "
        "mode, what the planner minimises); lockstep = `Σ_k max_r T(r,k)` (reshard mode). Orders: as planned "
        "(`lockstep_micro_batches()`; the Balancer plans longest first by its cost model), longest first by "
        "tokens (a naive proxy), longest first by estimated seconds (`lockstep_micro_batches(cost=...)`). "
        "Multipack runs one row per rank per micro-step: lockstep by construction (its rows in its own order).",
        "",
        "| scenario | lengths | K / step | pads / step | uneven steps | lockstep ÷ free: plan order (default) "
        "| by tokens | "
        "by seconds | Balancer lockstep vs multipack lockstep | vs multipack sorted | free: Balancer vs multipack |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        r = ratios(rec)
        bal = rec["seconds"]["balancer"]
        n = rec["steps"]
        lines.append(
            f"| {rec['scenario']['name']} | {rec['lengths']} | {bal['micro_batches'] / n:.1f} "
            f"| {bal['pads'] / n:.1f} | "
            f"{rec['uneven_steps']}/{n} | {r['plan_over_free']:.3f} | {r['tokens_over_free']:.3f} | "
            f"{r['seconds_over_free']:.3f} | {r['vs_multipack_lockstep']:.3f}× | "
            f"{r['vs_multipack_lockstep_sorted']:.3f}× | {r['free_vs_multipack_free']:.3f}× |"
        )
    lines += [
        "",
        "K: micro-batches every rank runs in lockstep (the step's largest count); pads: one-token micro-batches "
        "over all ranks; uneven: steps whose ranks got different counts. `vs multipack` = multipack's step time "
        "over the Balancer's lockstep (by seconds) step time: > 1 means the Balancer in lockstep is faster.",
        "",
        f"Machine: {meta['machine']['cpus']} CPUs, load {meta['machine']['load_avg_1_5_15']} (not timing-relevant: "
        f"no wall clock is measured), {meta['machine']['time']}.",
        "",
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", action="append", default=[],
                   help=f"length file (Parquet) or bundled name; repeatable (default: {', '.join(DEFAULT_SETS)})")
    p.add_argument("--scenario", action="append", default=[], help=f"one of {', '.join(s.name for s in SCENARIOS)}")
    p.add_argument("--steps", type=int, default=0, help="global batches per row (default 20; 3 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 steps per row (a smoke run)")
    p.add_argument("--out", default="lockstep", help="results name: benchmarks/results/<out>.json and .md")
    args = p.parse_args(argv)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    if args.scenario and len(scenarios) != len(set(args.scenario)):
        raise SystemExit(f"unknown scenario in {args.scenario}; choose from {', '.join(s.name for s in SCENARIOS)}")
    steps = args.steps or (3 if args.quick else 20)
    sets = args.lengths or list(DEFAULT_SETS)
    records = []
    for set_name in sets:
        path = Path(set_name) if Path(set_name).exists() else bundled_path(set_name)
        lengths = read_lengths(path)
        for scn in scenarios:
            rec = {"lengths": Path(set_name).stem, **run(scn, lengths, steps, args.seed)}
            rec["ratios"] = ratios(rec)
            records.append(rec)
            r = rec["ratios"]
            print(f"{scn.name:<14} {rec['lengths']:<32} lockstep/free: plan {r['plan_over_free']:.3f} "
                  f"tokens {r['tokens_over_free']:.3f} seconds {r['seconds_over_free']:.3f}   vs multipack lockstep "
                  f"{r['vs_multipack_lockstep']:.3f}x  (free vs free {r['free_vs_multipack_free']:.3f}x)", flush=True)
    meta = {"steps": steps, "seed": args.seed, "hardware": HARDWARE, "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(records, meta))
    print(f"wrote {RESULTS / (args.out + '.json')} and .md")


if __name__ == "__main__":
    main()
