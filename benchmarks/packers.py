"""Packers benchmark: quality against lower bounds and latency of every algorithm in ``packers``.

    python benchmarks/packers.py [--lengths PATH]... [--caps 8192,32768,131072] [--seed 0]
                                 [--instances N] [--quick]

Default: every bundled length file (``balancer.data.bundled_names()``), lengths capped at
each of ``--caps`` tokens (``s = min(s, cap)``). Writes ``benchmarks/results/packers.json``
and ``packers.md`` and prints the markdown.

**Stage-1 instances** (``--instances`` per file and cap): 4,096 sequences sampled with
replacement, 64 bins in four types with the per-replica cost coefficients Hydraulis
publishes for a 13B model on 80 GB GPUs (``balancer/data/instances_hydraulis_13b_64gpu.json``,
milliseconds converted to seconds): time ``a·s² + b·s`` on a bin of type

    =======  =====  ===============  =============  ============  =============
    type     bins   a (ms/token²)    b (ms/token)   pp weight     max length
    =======  =====  ===============  =============  ============  =============
    tp8      4      6.59e-7          0.0667         0             cap
    tp4      8      1.63e-6          0.0998         0             cap / 2
    tp2pp2   8      1.53e-6          0.0901         1 (mix "pp")  cap / 4
    tp1      44     1.03e-5          0.3123         0             cap / 8
    =======  =====  ===============  =============  ============  =============

(a sequence longer than a type's max length is not eligible there), and 10 % of the bins,
drawn per instance, run at a speed drawn from U(0.7, 0.95) (stragglers). Two mixes: "tp"
(the tp2 bins without pipeline, weight 0) and "pp" (tp2pp2 with weight 1: the largest
sequence of a bin counts twice, the 1F1B bubble). Measured per instance: LPT + local
search (``lpt_makespan``) result / bound and latency; CP-SAT with a 200 ms limit
(``cpsat_makespan``, hint = the LPT answer) result / bound and latency. The bound is
``makespan_lower_bound`` (single item, volume, eligibility pigeonhole / L2, LP by type).

**Bound check** (is a gap the algorithm or the bound?): small instances of the same mixes
(256 sequences, 8 bins: 1 tp8, 1 tp4, 2 tp2, 4 tp1) where the full CP-SAT model runs for
3 s: LPT / bound, CP-SAT / bound and CP-SAT's proven bound / our bound.

**Bin packing**: 1,000,000 lengths sampled from all files together, packed by FFD and BFD
at each cap: time and bins / L2 bound. **Min-max packing** (stage-2-like): 64 sequences
into ``k = max(2, ceil(1.25·Σ/cap))`` micro-batches of ``cap`` tokens, times of the tp4
type: ``minmax_pack`` and ``cpsat_minmax_pack`` (200 ms) against
``minmax_pack_lower_bound``. **Partition**: the tp8 times of the stage-1 sequences split
64 ways by Karmarkar–Karp (plain and equal counts) against max(max, Σ/64).

Targets (2-core machine, JIT warmed): LPT + LS within 3 % of the bound on >= 95 % of
instances; FFD of 1,000,000 items < 1 s; CP-SAT (200 ms) within 1 % of the bound on
>= 90 % of instances. Timings depend on the machine's load: ``os.getloadavg()`` is
recorded at the start and the end. ``--quick`` runs a smoke version in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

import packers as P  # noqa: E402
from balancer.data import bundled_names, bundled_path, read_lengths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# (name, a [ms/token²], b [ms/token], pp weight in the "pp" mix, max length as a fraction of cap, bins)
TYPES: list[tuple[str, float, float, float, float, int]] = [
    ("tp8", 6.59233262e-07, 0.0666817542, 0.0, 1.0, 4),
    ("tp4", 1.62871921e-06, 0.0997626395, 0.0, 0.5, 8),
    ("tp2pp2", 1.53436151e-06, 0.0900918438, 1.0, 0.25, 8),
    ("tp1", 1.03359006e-05, 0.312262914, 0.0, 0.125, 44),
]
MIXES = ("tp", "pp")
ITEMS = 4096
CPSAT_LIMIT = 0.2
STRAGGLER_FRACTION = 0.1


# ----------------------------------------------------------------------------------------
# instances


def stage1_instance(
    lengths: np.ndarray, cap: int, rng: np.random.Generator, *, mix: str, items: int = ITEMS, bins_scale: float = 1.0
) -> dict[str, np.ndarray]:
    """One stage-1 instance: times (seconds), bin types, speeds, pipeline weights."""
    s = rng.choice(np.minimum(lengths, cap), items).astype(np.float64)
    cols = []
    for _, a, b, _, frac, _ in TYPES:
        t = (a * s * s + b * s) / 1000.0  # ms → s
        cols.append(np.where(s <= max(1, int(frac * cap)), t, np.inf))
    counts = [max(1, round(c * bins_scale)) for *_, c in TYPES]
    bin_type = np.repeat(np.arange(len(TYPES)), counts).astype(np.int64)
    pp = np.array([TYPES[k][3] if mix == "pp" else 0.0 for k in bin_type])
    speed = np.ones(bin_type.shape[0])
    slow = rng.random(bin_type.shape[0]) < STRAGGLER_FRACTION
    speed[slow] = rng.uniform(0.7, 0.95, int(slow.sum()))
    return {"times": np.stack(cols, axis=1), "bin_type": bin_type, "speed": speed, "pp_weight": pp, "lengths": s.astype(np.int64)}


def small_instance(lengths: np.ndarray, cap: int, rng: np.random.Generator, *, mix: str) -> dict[str, np.ndarray]:
    """256 sequences over 8 bins (1 tp8, 1 tp4, 2 tp2, 4 tp1) for the bound check."""
    inst = stage1_instance(lengths, cap, rng, mix=mix, items=256, bins_scale=0.0)
    inst["bin_type"] = np.array([0, 1, 2, 2, 3, 3, 3, 3], dtype=np.int64)
    inst["pp_weight"] = np.array([TYPES[k][3] if mix == "pp" else 0.0 for k in inst["bin_type"]])
    inst["speed"] = np.ones(8)
    return inst


def load_lengths(paths: list[str] | None) -> dict[str, np.ndarray]:
    if not paths:
        return {name: read_lengths(bundled_path(name)) for name in bundled_names()}
    return {Path(p).stem: read_lengths(p) for p in paths}


# ----------------------------------------------------------------------------------------
# measurements


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def warm_up() -> None:
    """Compile / load every numba kernel once so latencies exclude the JIT."""
    rng = np.random.default_rng(0)
    inst = stage1_instance(rng.integers(1, 5000, 1000), 8192, rng, mix="pp", items=300)
    kw = {k: inst[k] for k in ("speed", "pp_weight")}
    a = P.lpt_makespan(inst["times"], inst["bin_type"], **kw)
    P.makespan_lower_bound(inst["times"], inst["bin_type"], **kw)
    P.cpsat_makespan(inst["times"], inst["bin_type"], hint=a.bin_of, time_limit=0.05, **kw)
    sizes = rng.integers(1, 1000, 1000)
    P.first_fit_decreasing(sizes, 4096)
    P.best_fit_decreasing(sizes, 4096)
    P.bin_packing_lower_bound(sizes, 4096)
    P.minmax_pack(sizes[:64] * 1e-3, sizes[:64], 8, 16384)
    P.cpsat_minmax_pack(sizes[:64] * 1e-3, sizes[:64], 8, 16384, time_limit=0.05)
    P.karmarkar_karp(sizes * 1.0, 8)
    P.karmarkar_karp(sizes * 1.0, 8, equal_counts=True)


def run_stage1(lengths: dict[str, np.ndarray], caps: list[int], instances: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for name, lens in lengths.items():
        for cap in caps:
            for mix in MIXES:
                rng = np.random.default_rng([seed, cap, MIXES.index(mix)])
                for r in range(instances):
                    inst = stage1_instance(lens, cap, rng, mix=mix)
                    kw = {k: inst[k] for k in ("speed", "pp_weight")}
                    lb = P.makespan_lower_bound(inst["times"], inst["bin_type"], **kw)
                    plain, t_plain = timed(P.lpt_makespan, inst["times"], inst["bin_type"], lp_guide=False, local_search=False, **kw)
                    lpt, t_lpt = timed(P.lpt_makespan, inst["times"], inst["bin_type"], **kw)
                    cps, t_cps = timed(
                        P.cpsat_makespan, inst["times"], inst["bin_type"], hint=lpt.bin_of, time_limit=CPSAT_LIMIT, seed=r, **kw
                    )
                    rows.append(
                        {
                            "file": name, "cap": cap, "mix": mix, "instance": r, "bound": lb,
                            "plain_ratio": plain.makespan / lb, "plain_seconds": t_plain,
                            "lpt": lpt.makespan, "lpt_ratio": lpt.makespan / lb, "lpt_seconds": t_lpt, "lpt_solver": lpt.solver,
                            "cpsat": cps.makespan, "cpsat_ratio": cps.makespan / lb, "cpsat_seconds": t_cps, "cpsat_solver": cps.solver,
                        }
                    )
    return rows


def run_bound_check(lengths: dict[str, np.ndarray], caps: list[int], per_cell: int, seed: int, limit: float) -> list[dict[str, Any]]:
    rows = []
    for name, lens in lengths.items():
        for cap in caps:
            for mix in MIXES:
                rng = np.random.default_rng([seed, cap, 7, MIXES.index(mix)])
                for r in range(per_cell):
                    inst = small_instance(lens, cap, rng, mix=mix)
                    kw = {k: inst[k] for k in ("speed", "pp_weight")}
                    lb = P.makespan_lower_bound(inst["times"], inst["bin_type"], **kw)
                    lpt = P.lpt_makespan(inst["times"], inst["bin_type"], **kw)
                    cps = P.cpsat_makespan(inst["times"], inst["bin_type"], hint=lpt.bin_of, time_limit=limit, seed=r, **kw)
                    proven = cps.bound if cps.bound is not None else lb
                    rows.append(
                        {
                            "file": name, "cap": cap, "mix": mix, "bound": lb, "lpt_ratio": lpt.makespan / lb,
                            "cpsat_ratio": cps.makespan / lb, "cpsat_status": cps.status,
                            "proven_ratio": max(proven, lb) / lb,
                        }
                    )
    return rows


def run_binpack(lengths: dict[str, np.ndarray], caps: list[int], items: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    pool = np.concatenate(list(lengths.values()))
    rows = []
    for cap in caps:
        sizes = rng.choice(np.minimum(pool, cap), items)
        lb = P.bin_packing_lower_bound(sizes, cap)
        for fn in (P.first_fit_decreasing, P.best_fit_decreasing):
            packing, secs = timed(fn, sizes, cap)
            rows.append({"algorithm": packing.solver, "cap": cap, "items": items, "seconds": secs, "bins": packing.num_bins, "l2": lb})
    return rows


def run_minmax(lengths: dict[str, np.ndarray], caps: list[int], instances: int, seed: int) -> list[dict[str, Any]]:
    _, a, b, _, _, _ = TYPES[1]
    rows = []
    for name, lens in lengths.items():
        for cap in caps:
            rng = np.random.default_rng([seed, cap, 11])
            for r in range(instances):
                sizes = rng.choice(np.minimum(lens, cap), 64).astype(np.int64)
                times = (a * sizes.astype(float) ** 2 + b * sizes) / 1000.0
                k = max(2, math.ceil(1.25 * sizes.sum() / cap))
                lb = P.minmax_pack_lower_bound(times, sizes, k, cap)
                got, secs = timed(P.minmax_pack, times, sizes, k, cap)
                cps, csecs = timed(P.cpsat_minmax_pack, times, sizes, k, cap, hint=got.bin_of, time_limit=CPSAT_LIMIT, seed=r)
                rows.append(
                    {
                        "file": name, "cap": cap, "bins": k, "ratio": got.makespan / lb, "seconds": secs,
                        "cpsat_ratio": cps.makespan / lb, "cpsat_seconds": csecs, "cpsat_status": cps.status,
                    }
                )
    return rows


def run_partition(lengths: dict[str, np.ndarray], caps: list[int], instances: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for name, lens in lengths.items():
        for cap in caps:
            rng = np.random.default_rng([seed, cap, 13])
            for _ in range(instances):
                t = stage1_instance(lens, cap, rng, mix="tp")["times"][:, 0]
                for equal in (False, True):
                    got, secs = timed(P.karmarkar_karp, t, 64, equal_counts=equal)
                    rows.append({"file": name, "cap": cap, "equal_counts": equal, "ratio": got.makespan / got.bound, "seconds": secs})
    return rows


# ----------------------------------------------------------------------------------------
# report


def q(values: list[float], p: float) -> float:
    return float(np.quantile(np.asarray(values), p)) if values else float("nan")


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    s1 = result["stage1"]
    summary: dict[str, Any] = {}
    for mix in (*MIXES, "all"):
        rows = [r for r in s1 if mix == "all" or r["mix"] == mix]
        if not rows:
            continue
        summary[f"stage1_{mix}"] = {
            "instances": len(rows),
            "lpt_within_3pct": float(np.mean([r["lpt_ratio"] <= 1.03 for r in rows])),
            "lpt_ratio_median": q([r["lpt_ratio"] for r in rows], 0.5),
            "lpt_ratio_p95": q([r["lpt_ratio"] for r in rows], 0.95),
            "lpt_ratio_max": max(r["lpt_ratio"] for r in rows),
            "lpt_ms_median": 1000 * q([r["lpt_seconds"] for r in rows], 0.5),
            "lpt_ms_p99": 1000 * q([r["lpt_seconds"] for r in rows], 0.99),
            "cpsat_within_1pct": float(np.mean([r["cpsat_ratio"] <= 1.01 for r in rows])),
            "cpsat_ratio_median": q([r["cpsat_ratio"] for r in rows], 0.5),
            "cpsat_ratio_max": max(r["cpsat_ratio"] for r in rows),
            "cpsat_improved": float(np.mean([r["cpsat"] < r["lpt"] for r in rows])),
            "cpsat_ms_median": 1000 * q([r["cpsat_seconds"] for r in rows], 0.5),
            "plain_within_3pct": float(np.mean([r["plain_ratio"] <= 1.03 for r in rows])),
            "plain_ratio_median": q([r["plain_ratio"] for r in rows], 0.5),
            "plain_ratio_max": max(r["plain_ratio"] for r in rows),
            "plain_ms_median": 1000 * q([r["plain_seconds"] for r in rows], 0.5),
            "plain_ms_p99": 1000 * q([r["plain_seconds"] for r in rows], 0.99),
        }
    summary["targets"] = {
        "lpt_within_3pct_on_95pct": summary["stage1_all"]["lpt_within_3pct"] >= 0.95,
        "ffd_1m_under_1s": all(r["seconds"] < 1.0 for r in result["binpack"] if r["algorithm"] == "ffd"),
        "cpsat_within_1pct_on_90pct": summary["stage1_all"]["cpsat_within_1pct"] >= 0.90,
    }
    return summary


def markdown(result: dict[str, Any]) -> str:
    sm = result["summary"]
    out = [
        "# packers benchmark",
        "",
        f"Machine: {result['machine']}; load average {result['load_start']} at start, {result['load_end']} at end. "
        f"Seed {result['seed']}, {result['instances']} stage-1 instances per file × cap × mix; "
        f"{ITEMS} sequences over {sum(c for *_, c in TYPES)} bins. Run time {result['seconds']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| LPT + LS within 3 % of the bound on ≥ 95 % of instances | {100 * sm['stage1_all']['lpt_within_3pct']:.1f} % | {'yes' if sm['targets']['lpt_within_3pct_on_95pct'] else 'no'} |",
        f"| FFD of {result['binpack'][0]['items']:,} items < 1 s | {max(r['seconds'] for r in result['binpack'] if r['algorithm'] == 'ffd'):.3f} s (worst cap) | {'yes' if sm['targets']['ffd_1m_under_1s'] else 'no'} |",
        f"| CP-SAT (200 ms) within 1 % of the bound on ≥ 90 % of instances | {100 * sm['stage1_all']['cpsat_within_1pct']:.1f} % | {'yes' if sm['targets']['cpsat_within_1pct_on_90pct'] else 'no'} |",
        "",
        "## Stage 1: makespan (result / lower bound; latency of the call)",
        "",
        "| mix | instances | LPT+LS ≤ 1.03 | median | p95 | max | LPT+LS ms (median / p99) | CP-SAT ≤ 1.01 | CP-SAT median | CP-SAT max | CP-SAT improved | CP-SAT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mix in (*MIXES, "all"):
        r = sm.get(f"stage1_{mix}")
        if r:
            out.append(
                f"| {mix} | {r['instances']} | {100 * r['lpt_within_3pct']:.1f} % | {r['lpt_ratio_median']:.4f} | {r['lpt_ratio_p95']:.4f} | "
                f"{r['lpt_ratio_max']:.4f} | {r['lpt_ms_median']:.1f} / {r['lpt_ms_p99']:.1f} | {100 * r['cpsat_within_1pct']:.1f} % | "
                f"{r['cpsat_ratio_median']:.4f} | {r['cpsat_ratio_max']:.4f} | {100 * r['cpsat_improved']:.0f} % | {r['cpsat_ms_median']:.0f} |"
            )
    out += ["", "Reference: plain LPT (`lp_guide=False, local_search=False`, the fastest path):", "",
            "| mix | ≤ 1.03 | median | max | ms (median / p99) |", "|---|---|---|---|---|"]
    for mix in (*MIXES, "all"):
        r = sm.get(f"stage1_{mix}")
        if r:
            out.append(f"| {mix} | {100 * r['plain_within_3pct']:.1f} % | {r['plain_ratio_median']:.4f} | {r['plain_ratio_max']:.4f} | {r['plain_ms_median']:.2f} / {r['plain_ms_p99']:.2f} |")
    out += ["", "Per file and cap (median LPT+LS / bound, tp mix | pp mix; worst in brackets):", "",
            "| file | " + " | ".join(f"cap {c:,}" for c in result["caps"]) + " |",
            "|---|" + "---|" * len(result["caps"])]
    for name in result["files"]:
        cells = []
        for cap in result["caps"]:
            parts = []
            for mix in MIXES:
                v = [r["lpt_ratio"] for r in result["stage1"] if r["file"] == name and r["cap"] == cap and r["mix"] == mix]
                parts.append(f"{np.median(v):.4f} ({max(v):.4f})" if v else "–")
            cells.append(" \\| ".join(parts))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    bc = result["bound_check"]
    if bc:
        out += ["", "## Bound check (256 sequences, 8 bins, full CP-SAT model, "
                f"{result['bound_check_limit']:g} s; ratios to our bound)", "",
                "| mix | instances | CP-SAT optimal | LPT+LS median / max | CP-SAT median / max | CP-SAT proven bound median / max |",
                "|---|---|---|---|---|---|"]
        for mix in MIXES:
            rows = [r for r in bc if r["mix"] == mix]
            if rows:
                out.append(
                    f"| {mix} | {len(rows)} | {sum(r['cpsat_status'] == 'OPTIMAL' for r in rows)} | "
                    f"{q([r['lpt_ratio'] for r in rows], .5):.4f} / {max(r['lpt_ratio'] for r in rows):.4f} | "
                    f"{q([r['cpsat_ratio'] for r in rows], .5):.4f} / {max(r['cpsat_ratio'] for r in rows):.4f} | "
                    f"{q([r['proven_ratio'] for r in rows], .5):.4f} / {max(r['proven_ratio'] for r in rows):.4f} |"
                )
    out += ["", "## Bin packing", "", "| algorithm | cap | items | seconds | bins | L2 bound | bins / L2 |", "|---|---|---|---|---|---|---|"]
    for r in result["binpack"]:
        out.append(f"| {r['algorithm']} | {r['cap']:,} | {r['items']:,} | {r['seconds']:.3f} | {r['bins']:,} | {r['l2']:,} | {r['bins'] / r['l2']:.4f} |")
    mm = result["minmax"]
    if mm:
        out += ["", "## Min-max packing (64 sequences, tp4 times; result / bound)", "",
                "| method | instances | median | p95 | max | ms (median) |", "|---|---|---|---|---|---|",
                f"| minmax_pack | {len(mm)} | {q([r['ratio'] for r in mm], .5):.4f} | {q([r['ratio'] for r in mm], .95):.4f} | {max(r['ratio'] for r in mm):.4f} | {1000 * q([r['seconds'] for r in mm], .5):.2f} |",
                f"| cpsat_minmax_pack (200 ms) | {len(mm)} | {q([r['cpsat_ratio'] for r in mm], .5):.4f} | {q([r['cpsat_ratio'] for r in mm], .95):.4f} | {max(r['cpsat_ratio'] for r in mm):.4f} | {1000 * q([r['cpsat_seconds'] for r in mm], .5):.0f} |"]
    kk = result["partition"]
    if kk:
        out += ["", "## Karmarkar–Karp, 64-way (result / bound)", "", "| variant | instances | median | max | ms (median) |", "|---|---|---|---|---|"]
        for equal in (False, True):
            rows = [r for r in kk if r["equal_counts"] == equal]
            out.append(f"| {'equal counts' if equal else 'plain'} | {len(rows)} | {q([r['ratio'] for r in rows], .5):.4f} | {max(r['ratio'] for r in rows):.4f} | {1000 * q([r['seconds'] for r in rows], .5):.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", action="append", help="Parquet length file (repeatable); default: every bundled file")
    ap.add_argument("--caps", default="8192,32768,131072", help="comma-separated length caps in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instances", type=int, default=6, help="stage-1 instances per file, cap and mix")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 instance, two files, small bin packing")
    ap.add_argument("--out", default=str(RESULTS), help="output folder for packers.json / packers.md")
    args = ap.parse_args(argv)
    caps = [int(c) for c in args.caps.split(",") if c]
    lengths = load_lengths(args.lengths)
    if args.quick:
        lengths = dict(list(lengths.items())[:2])
    instances = 1 if args.quick else args.instances
    load_start = os.getloadavg()
    start = time.perf_counter()
    warm_up()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "seed": args.seed, "instances": instances, "caps": caps, "files": list(lengths),
        "stage1": run_stage1(lengths, caps, instances, args.seed),
        "bound_check": run_bound_check(lengths, caps[:1] if args.quick else caps, 1, args.seed, 0.5 if args.quick else 3.0),
        "bound_check_limit": 0.5 if args.quick else 3.0,
        "binpack": run_binpack(lengths, caps, 100_000 if args.quick else 1_000_000, args.seed),
        "minmax": run_minmax(lengths, caps, instances, args.seed),
        "partition": run_partition(lengths, caps, instances, args.seed),
    }
    result["seconds"] = time.perf_counter() - start
    result["load_start"] = [round(x, 2) for x in load_start]
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summarise(result)
    text = markdown(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packers.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "packers.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
