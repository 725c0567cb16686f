"""Ablations behind two claims of the docs: the baselines' static layout, and regime mixes.

::

    python benchmarks/ablations.py [--lengths PATH]... [--scenario NAME]... [--steps N] [--quick]

Scenarios, cost models and length sets are :mod:`benchmarks.planner`'s (imported, not
copied); the default sets are its bundled Wikipedia, code, books and SFT sets. Two parts:

(a) **Static layouts** (``docs/baselines.md``, "Is it the best static layout?"). For every
    scenario of 16–64 GPUs, every homogeneous layout of the Balancer's layout pool
    (:func:`balancer.candidates.enumerate_layouts`, pipelines included on the published
    profile) whose token capacity holds ``max_length`` runs the ``multipack`` and
    ``wlb_llm`` baselines on the same batches (:func:`balancer.simulation.simulate` with
    ``baseline_strategy``). The table marks the layout
    :func:`balancer.baselines.static_layout` picks (the baselines' rule) and whether it has
    the highest tokens/s under each policy; ``pick / best`` is its tokens/s over the
    fastest layout's.

(b) **Regime mixes** (``docs/balancer.md``, candidate pool step 3). The Balancer on the
    default pool (``regime_mixes=True``) against the pool built with
    ``regime_mixes=False``, every scenario: same batches, same seeds, tokens/s ratio, the
    steps the default pool's Balancer ran a strategy the other pool lacks, the distinct
    strategies each used, and the median plan latency of each. Plan
    latency is process CPU time (one thread), measured by re-planning the simulated
    batches with the two Balancers interleaved step by step, so machine load hits both
    alike; the JIT is warmed first.

Writes ``benchmarks/results/ablations.json`` and ``ablations.md`` (``ablations_quick.*``
with ``--quick``). The machine's load is recorded next to the numbers.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # process CPU time of one thread (set before numpy/numba load)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, HERE)]


def _load_planner() -> Any:
    """``benchmarks/planner.py`` as a module (this folder is not a package)."""
    spec = importlib.util.spec_from_file_location("planner_bench", HERE / "planner.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


planner = sys.modules.get("planner_bench") or _load_planner()

from balancer.baselines import static_layout  # noqa: E402
from balancer.candidates import enumerate_layouts  # noqa: E402
from balancer.cost import CostModel  # noqa: E402
from balancer.data import bundled_path, read_lengths  # noqa: E402
from balancer.pool import generate_candidates  # noqa: E402
from balancer.selector import Balancer  # noqa: E402
from balancer.simulation import BALANCER, SimulationConfig, global_batches, simulate  # noqa: E402
from strategies.layout import ClusterSpec, Layout, Strategy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STATIC_POLICIES = ("multipack", "wlb_llm")
"""Baselines run on every layout in part (a): a packer and the near-perfectly balanced one."""
STATIC_GPUS = (16, 64)
"""Part (a) covers the scenarios with this many GPUs, inclusive range."""
DEFAULT_STEPS = 20
"""Steps per run of the default invocation, as in the planner benchmark (~5 minutes on 2 loaded cores)."""
QUICK_STEPS = 2


# ----------------------------------------------------------------------------------------
# (a) static layouts
# ----------------------------------------------------------------------------------------


def layouts_holding(scn: Any, cluster: ClusterSpec, cost: CostModel) -> list[Layout]:
    """The homogeneous layouts of the Balancer's pool whose token capacity holds ``max_length``."""
    pool = enumerate_layouts(cluster, cost, allow_pp=scn.cost == "hydraulis")
    return [
        lay for lay in pool
        if cluster.num_ranks % lay.size == 0 and cost.token_capacity(lay) >= scn.max_length
    ]


def static_record(scn: Any, set_name: str, lengths: np.ndarray, steps: int, seed: int) -> dict[str, Any]:
    """tokens/s of every layout holding ``max_length`` under :data:`STATIC_POLICIES`."""
    cluster = ClusterSpec(num_ranks=scn.num_gpus, ranks_per_node=8)
    cost = planner.scenario_cost_model(scn)
    capped = np.minimum(lengths, scn.max_length)
    pick = static_layout(cluster, cost, scn.max_length)
    config = SimulationConfig(
        tokens_per_step=scn.tokens_per_step, num_steps=steps, max_length=scn.max_length, seed=seed,
        policies=STATIC_POLICIES,
    )
    rows = []
    for lay in layouts_holding(scn, cluster, cost):
        res = simulate(capped, cluster, cost, config, baseline_strategy=Strategy.homogeneous(lay, cluster.num_ranks))
        rows.append({
            "layout": lay.name,
            "size": lay.size,
            "tokens_per_second": {p: res.traces[p].summary()["tokens_per_second"] for p in STATIC_POLICIES},
        })
    verdict = {}
    for p in STATIC_POLICIES:
        best = max(rows, key=lambda r: r["tokens_per_second"][p])
        mine = next(r for r in rows if r["layout"] == pick.name)
        verdict[p] = {
            "fastest": best["layout"],
            "pick_is_fastest": best["layout"] == pick.name,
            "pick_over_fastest": mine["tokens_per_second"][p] / best["tokens_per_second"][p],
        }
    return {
        "scenario": scn.name, "lengths": set_name, "num_gpus": scn.num_gpus, "max_length": scn.max_length,
        "cost_model": scn.cost, "static_layout": pick.name, "layouts": rows, "verdict": verdict,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def static_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per scenario × set; the layouts by tokens/s, the pick in bold."""
    head = ("| scenario | lengths | static_layout pick | multipack: pick fastest? (pick / best) | "
            "wlb_llm: pick fastest? (pick / best) | every layout holding max_length: multipack / wlb_llm tokens/s |\n"
            "|---|---|---|---|---|---|\n")
    rows = []
    for r in records:
        cells = []
        for lay in sorted(r["layouts"], key=lambda x: -x["tokens_per_second"]["multipack"]):
            tps = " / ".join(f"{lay['tokens_per_second'][p] / 1e3:.1f}K" for p in STATIC_POLICIES)
            name = f"**{lay['layout']}**" if lay["layout"] == r["static_layout"] else lay["layout"]
            cells.append(f"{name} {tps}")
        verdicts = [
            ("yes" if v["pick_is_fastest"] else f"**no** ({v['fastest']})") + f" ({v['pick_over_fastest']:.3f})"
            for v in (r["verdict"][p] for p in STATIC_POLICIES)
        ]
        rows.append(f"| {r['scenario']} | {r['lengths']} | {r['static_layout']} | {verdicts[0]} | {verdicts[1]} | "
                    + ", ".join(cells) + " |")
    return head + "\n".join(rows) + "\n" + "\n" + static_verdict(records)


def static_verdict(records: list[dict[str, Any]]) -> str:
    """One line: in how many rows the pick is the fastest under every policy, and the exceptions."""
    misses = [
        f"{r['scenario']} on {r['lengths']} under `{p}` ({r['verdict'][p]['fastest']} is faster, pick at "
        f"{r['verdict'][p]['pick_over_fastest']:.3f}×)"
        for r in records for p in STATIC_POLICIES if not r["verdict"][p]["pick_is_fastest"]
    ]
    won = sum(all(r["verdict"][p]["pick_is_fastest"] for p in STATIC_POLICIES) for r in records)
    line = f"`static_layout`'s pick is the fastest layout under both policies in {won} of {len(records)} rows"
    return line + (": " + "; ".join(misses) + ".\n" if misses else ".\n")


# ----------------------------------------------------------------------------------------
# (b) regime mixes
# ----------------------------------------------------------------------------------------


def candidate_pool(scn: Any, capped: np.ndarray, cluster: ClusterSpec, cost: CostModel, seed: int,
                   regime_mixes: bool) -> list[Strategy]:
    """The planner benchmark's pool for ``scn`` (published strategy added on the published
    profile), built with or without regime mixes."""
    published = scn.cost == "hydraulis"
    got = generate_candidates(
        capped, cluster, cost, batch_tokens=scn.tokens_per_step, max_length=scn.max_length, seed=seed,
        allow_pp=published, regime_mixes=regime_mixes,
    )
    candidates = list(got.strategies)
    if published:
        own = planner.hydraulis_strategy()
        if own.num_ranks == scn.num_gpus and all(own.counts() != c.counts() for c in candidates):
            candidates.append(own)
    return candidates


def paired_plan_ms(capped: np.ndarray, scn: Any, cluster: ClusterSpec, cost: CostModel,
                   pools: Sequence[list[Strategy]], steps: int, seed: int) -> list[np.ndarray]:
    """Process CPU milliseconds per step of one Balancer per pool, on the simulation's
    batches, the Balancers interleaved (their order alternating) step by step."""
    batches = [b for _, b in zip(range(steps), global_batches(capped, scn.tokens_per_step, seed))]
    warm = batches[0]
    for cands in pools:  # JIT and caches, outside the timing
        Balancer(cluster, cands, cost).plan(capped[warm.sample_ids], step=0, sample_ids=warm.sample_ids)
    balancers = [Balancer(cluster, cands, cost) for cands in pools]
    ms = [np.zeros(steps) for _ in pools]
    for k, b in enumerate(batches):
        order = range(len(pools)) if k % 2 == 0 else reversed(range(len(pools)))
        for i in order:
            t0 = time.process_time()
            balancers[i].plan(capped[b.sample_ids], step=b.step, sample_ids=b.sample_ids)
            ms[i][k] = (time.process_time() - t0) * 1e3
    return ms


def regime_record(scn: Any, set_name: str, lengths: np.ndarray, steps: int, seed: int) -> dict[str, Any]:
    """The Balancer with and without regime mixes on the same batches."""
    cluster = ClusterSpec(num_ranks=scn.num_gpus, ranks_per_node=8)
    cost = planner.scenario_cost_model(scn)
    capped = np.minimum(lengths, scn.max_length)
    pools = {flag: candidate_pool(scn, capped, cluster, cost, seed, flag) for flag in (True, False)}
    config = SimulationConfig(
        tokens_per_step=scn.tokens_per_step, num_steps=steps, max_length=scn.max_length, seed=seed, policies=(BALANCER,)
    )
    traces = {flag: simulate(capped, cluster, cost, config, candidates=pools[flag]).traces[BALANCER] for flag in (True, False)}
    ms_on, ms_off = paired_plan_ms(capped, scn, cluster, cost, [pools[True], pools[False]], steps, seed)
    on, off = traces[True].summary(), traces[False].summary()
    only_on = {s.name for s in pools[True]} - {s.name for s in pools[False]}
    return {
        "scenario": scn.name, "lengths": set_name, "num_gpus": scn.num_gpus, "cost_model": scn.cost,
        "tokens_per_step": scn.tokens_per_step,
        "with_regime_mixes": {"pool": [s.name for s in pools[True]], "tokens_per_second": on["tokens_per_second"],
                              "strategies_used": on["strategies_used"], "plan_ms_median": float(np.median(ms_on))},
        "without_regime_mixes": {"pool": [s.name for s in pools[False]], "tokens_per_second": off["tokens_per_second"],
                                 "strategies_used": off["strategies_used"], "plan_ms_median": float(np.median(ms_off))},
        "tokens_per_second_ratio": on["tokens_per_second"] / off["tokens_per_second"],
        "steps_on_strategies_missing_without": sum(st in only_on for st in traces[True].strategy),
        "steps": steps,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def regime_table(records: list[dict[str, Any]]) -> str:
    head = ("| scenario | lengths | tokens/s with / without regime mixes | ratio | steps on a strategy "
            "the pool without lacks | strategies used with / without | plan ms median with / without (process time) |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = []
    for r in records:
        on, off = r["with_regime_mixes"], r["without_regime_mixes"]
        own = f"{r['steps_on_strategies_missing_without']} of {r['steps']}"
        rows.append(
            f"| {r['scenario']} | {r['lengths']} | {on['tokens_per_second']:,.0f} / {off['tokens_per_second']:,.0f} | "
            f"{r['tokens_per_second_ratio']:.3f}× | {own} | {on['strategies_used']} / {off['strategies_used']} | "
            f"{on['plan_ms_median']:.1f} / {off['plan_ms_median']:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    sets = args.lengths or (["code_kafka"] if args.quick else list(planner.DEFAULT_SETS))
    scenarios = [s for s in planner.SCENARIOS if not args.scenario or s.name in args.scenario]
    if args.scenario and len(scenarios) != len(set(args.scenario)):
        known = ", ".join(s.name for s in planner.SCENARIOS)
        raise SystemExit(f"unknown scenario in {args.scenario}; choose from {known}")
    if args.quick and not args.scenario:
        scenarios = [s for s in scenarios if s.name in ("7b-16gpu-32k", "hydraulis13b-64gpu-400k")]
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 1:
        raise SystemExit(f"--steps {steps}: give at least 1 step")
    lo, hi = STATIC_GPUS
    start = planner.machine()
    t_start = time.perf_counter()
    print(f"load average {start['load_avg_1_5_15']} on {start['cpus']} CPUs; {steps} steps per run")
    static, regime = [], []
    for set_name in sets:
        path = Path(set_name)
        lengths = read_lengths(path if path.suffix else bundled_path(set_name))
        label = path.stem if path.suffix else set_name
        for scn in scenarios:
            t0 = time.perf_counter()
            if lo <= scn.num_gpus <= hi:
                static.append(static_record(scn, label, lengths, steps, args.seed))
            regime.append(regime_record(scn, label, lengths, steps, args.seed))
            print(f"{scn.name} on {label}: {time.perf_counter() - t0:.0f} s, load {regime[-1]['load_avg_at_end']}")
    wall = time.perf_counter() - t_start
    tables = static_table(static), regime_table(regime)
    print("\n(a) static layouts\n\n" + tables[0] + "\n(b) regime mixes\n\n" + tables[1])
    invocation = "python benchmarks/ablations.py" + (" --quick" if args.quick else "")
    end_load = [round(x, 2) for x in os.getloadavg()]
    md = (
        "# Ablations: the baselines' static layout, and regime mixes\n\n"
        f"`{invocation}`{' (default invocation)' if not args.quick else ''}, {start['time']}. "
        f"Machine: {start['cpus']} CPUs, load average {start['load_avg_1_5_15']} at start and {end_load} at the end; "
        f"wall time {wall / 60:.1f} min. {steps} steps per run (the planner benchmark runs 20), seed {args.seed}. Scenarios, cost models and length sets are "
        "`benchmarks/planner.py`'s.\n\n"
        f"## (a) Static layouts ({lo}–{hi} GPUs)\n\n"
        "Every homogeneous layout of the Balancer's layout pool that holds `max_length` runs `multipack` and "
        "`wlb_llm` on the same batches; the layout `static_layout` picks is in bold. \"pick / best\": the pick's "
        "tokens/s over the fastest layout's under that policy.\n\n" + tables[0]
        + "\n## (b) Regime mixes\n\n"
        "The Balancer on the default pool (`regime_mixes=True`) against the pool without regime mixes, same "
        "batches; ratio = tokens/s with over without. Plan ms: process CPU time, the two Balancers re-planning "
        "the same batches interleaved step by step.\n\n" + tables[1]
    )
    result = {"invocation": invocation, "machine": start, "load_avg_at_end": end_load, "wall_seconds": wall,
              "steps": steps, "seed": args.seed, "static_layouts": static, "regime_mixes": regime}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "ablations_quick" if args.quick else "ablations"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    print(f"wrote {out_dir / (stem + '.json')} and {stem}.md ({wall:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", action="append", metavar="PATH",
                   help="length file (Parquet with a 'length' column) or bundled name; repeatable "
                        "(default: the planner benchmark's bundled sets)")
    p.add_argument("--scenario", action="append", metavar="NAME", help="run only these scenarios; repeatable")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per run (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_STEPS} steps, code_kafka, two scenarios (7b-16gpu-32k, hydraulis13b-64gpu-400k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS), help="where ablations.json / ablations.md go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
