"""Cost-model benchmark: analytic coefficients per layout, a check against Hydraulis's
published 13B coefficients, pricing latency, and a CPU calibration.

    python benchmarks/cost_model.py --lengths PATH_OR_BUNDLED_NAME [--model llama-13b]
                                    [--hardware a100-80g] [--num-ranks 64] [--zero-stage 1]
                                    [--no-calibrate]

1. **Analytic table** — for every layout (tp ≤ 8, cp ≤ 4, pp ≤ 4, at most ``--num-ranks``
   ranks): ``a``, ``b`` (compute and communication parts), ``c``, token capacity and
   training throughput per device at the length file's median and 99th-percentile length.
2. **Against Hydraulis** — the analytic ``llama-13b`` on ``a100-80g`` (ZeRO-1 over 64
   ranks) next to the coefficients the Hydraulis authors fitted on their 13B runs
   (``balancer.data.INSTANCES_FILE``, converted to seconds): per layout, the ratio of
   predicted to published time at the file's median, p90 and largest length that fits.
   **Parallel efficiency** — the per-GPU linear cost ``b·tp·pp`` (and quadratic ``a·tp·pp``)
   of every published layout over tp1's, published vs the analytic model with its default
   ``tp_efficiency`` table (fitted to these ratios) and with the former single-term
   ``efficiency_decay=0.05``.
   **7B throughput** — tokens/s per GPU and MFU of ``llama-7b`` at 4,096 tokens on
   ``a100-80g`` and ``h100-80g`` (ZeRO-1 over 8) for tp = 1, 2, 4, 8.
3. **Pricing latency** — a first ``cost(layout)`` (resolving) and cached lookups, and
   ``seconds(lengths, layout)`` over the whole length file.
4. **Calibration** — ``CostModel.calibrate("tiny")`` on this CPU (one thread, CPU-time
   clock) next to the analytic ``tiny`` on the ``cpu`` preset.

Results: ``benchmarks/results/cost_model.json`` and ``cost_model.md``, with the machine
load (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

from balancer.analytic import AnalyticModel, AnalyticOptions  # noqa: E402
from balancer.cost import CostModel  # noqa: E402
from balancer.data import read_lengths  # noqa: E402
from balancer.specs import hardware_preset, model_preset  # noqa: E402
from strategies.layout import Layout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _layouts(num_ranks: int) -> list[Layout]:
    out = [Layout(tp, cp, pp) for tp in (1, 2, 4, 8) for cp in (1, 2, 4) for pp in (1, 2, 4)]
    return [lay for lay in out if lay.size <= num_ranks]


def analytic_table(args: argparse.Namespace, lengths: np.ndarray) -> list[dict[str, Any]]:
    am = AnalyticModel(
        model_preset(args.model), hardware_preset(args.hardware),
        AnalyticOptions(zero_stage=args.zero_stage, num_ranks=args.num_ranks),
    )
    p50, p99 = (int(np.percentile(lengths, q)) for q in (50, 99))
    rows = []
    for lay in _layouts(args.num_ranks):
        try:
            an = am.analyze(lay)
        except ValueError as e:
            rows.append({"layout": lay.name, "unsupported": str(e)})
            continue
        row: dict[str, Any] = {"layout": lay.name, **{k: v for k, v in an.to_dict().items() if k != "layout"}}
        for name, s in (("p50", p50), ("p99", p99)):
            row[f"tokens_per_s_per_device_{name}"] = am.tokens_per_second(lay, s) if 1 <= s <= an.token_capacity else None
        rows.append(row)
    return rows


def hydraulis_comparison(lengths: np.ndarray) -> list[dict[str, Any]]:
    published = CostModel.from_hydraulis_instance(unit="s")
    ours = CostModel.analytic("llama-13b", "a100-80g", zero_stage=1, num_ranks=64)
    rows = []
    for lay in published.layouts:
        pub, mine = published.cost(lay), ours.cost(lay)
        fit = lengths[lengths <= min(pub.token_capacity, mine.token_capacity)]
        row: dict[str, Any] = {
            "layout": lay.name, "published_capacity": pub.token_capacity, "analytic_capacity": mine.token_capacity,
            "published_c": pub.c, "analytic_c": mine.c,
        }
        for name, q in (("p50", 50), ("p90", 90), ("max", 100)):
            s = int(np.percentile(fit, q))
            row[f"len_{name}"] = s
            row[f"ratio_{name}"] = float((mine.seconds(s) + mine.c) / (pub.seconds(s) + pub.c))
        rows.append(row)
    return rows


def efficiency_fit() -> list[dict[str, Any]]:
    """Per-GPU ``b`` and ``a`` of each published layout over tp1's (``a`` over tp2pp2's: the
    published tp1 ``a`` comes from sequences of at most 1,536 tokens and is poorly determined)."""
    published = CostModel.from_hydraulis_instance(unit="s")
    ours = CostModel.analytic("llama-13b", "a100-80g", zero_stage=1, num_ranks=64)
    legacy = CostModel.analytic("llama-13b", "a100-80g", zero_stage=1, num_ranks=64, efficiency_decay=0.05)
    ref_a = Layout(tp=2, pp=2)
    rows = []
    for lay in published.layouts:
        row: dict[str, Any] = {"layout": lay.name}
        for name, m in (("published", published), ("analytic", ours), ("legacy", legacy)):
            row[f"b_ratio_{name}"] = m.cost(lay).b * lay.size / m.cost(Layout()).b
            row[f"a_ratio_{name}"] = m.cost(lay).a * lay.size / (m.cost(ref_a).a * ref_a.size)
        rows.append(row)
    return rows


def throughput_7b(length: int = 4096) -> list[dict[str, Any]]:
    """Tokens/s per GPU and MFU of llama-7b at ``length`` tokens, ZeRO-1 over 8 GPUs."""
    rows = []
    for hw in ("a100-80g", "h100-80g"):
        am = AnalyticModel(model_preset("llama-7b"), hardware_preset(hw), AnalyticOptions(zero_stage=1, num_ranks=8))
        for tp in (1, 2, 4, 8):
            lay = Layout(tp=tp)
            rows.append({"hardware": hw, "layout": lay.name, "length": length,
                         "tokens_per_s_per_gpu": am.tokens_per_second(lay, length),
                         "mfu": am.model_flops_utilization(lay, length)})
    return rows


def pricing_latency(lengths: np.ndarray) -> dict[str, float]:
    model = CostModel.analytic("llama-13b", "a100-80g", zero_stage=1, num_ranks=64)
    lays = _layouts(64)
    t0 = time.perf_counter()
    for lay in lays:
        model.supports(lay)
    first = (time.perf_counter() - t0) / len(lays)
    lay = Layout(tp=4)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        model.cost(lay)
    cached = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(20):
        model.seconds(lengths, lay)
    vec = (time.perf_counter() - t0) / 20
    return {"resolve_us": first * 1e6, "cached_us": cached * 1e6, "seconds_all_lengths_us": vec * 1e6,
            "num_lengths": int(lengths.size)}


def calibration() -> dict[str, Any]:
    t0 = time.perf_counter()
    model = CostModel.calibrate("tiny", repeats=5, num_threads=1, clock="process", progress=False)
    wall = time.perf_counter() - t0
    cal = model.cost(Layout())
    ana = CostModel.analytic("tiny", "cpu").cost(Layout())
    out = {"wall_seconds": wall, "r2": model.fit_r2(Layout()), "device": model.meta["device"],
           "calibrated": cal.to_dict(), "analytic_cpu_preset": ana.to_dict()}
    for s in (256, 1024, 2048):
        out[f"ratio_analytic_over_measured_{s}"] = float((ana.seconds(s) + ana.c) / (cal.seconds(s) + cal.c))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    out = [f"# Cost model ({res['lengths']}, {res['model']} on {res['hardware']}, "
           f"ZeRO-{res['zero_stage']} over {res['num_ranks']} ranks)", "",
           f"machine: {res['machine']}, load average {res['load']}", "",
           "## Analytic coefficients (seconds, tokens)", "",
           "| layout | a | b | b_tp | b_cp | b_pp | c | capacity | tok/s/dev p50 | tok/s/dev p99 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["analytic"]:
        if "unsupported" in r:
            out.append(f"| {r['layout']} | unsupported: {r['unsupported'][:80]} |||||||||")
            continue
        out.append("| " + " | ".join(_fmt(r[k]) for k in (
            "layout", "a", "b", "b_tp", "b_cp", "b_pp", "c", "token_capacity",
            "tokens_per_s_per_device_p50", "tokens_per_s_per_device_p99")) + " |")
    out += ["", "## Analytic llama-13b / A100-80G vs Hydraulis's published 13B fits", "",
            "ratio = analytic (t(s)+c) / published (t(s)+c)", "",
            "| layout | capacity analytic / published | c analytic / published (s) | ratio p50 (len) | ratio p90 (len) | ratio max (len) |",
            "|---|---|---|---|---|---|"]
    for r in res["hydraulis"]:
        out.append(
            f"| {r['layout']} | {r['analytic_capacity']} / {r['published_capacity']} | "
            f"{r['analytic_c']:.3g} / {r['published_c']:.3g} | "
            + " | ".join(f"{r[f'ratio_{k}']:.2f} ({r[f'len_{k}']})" for k in ("p50", "p90", "max")) + " |"
        )
    out += ["", "## Parallel efficiency: per-GPU cost over tp1, published vs analytic", "",
            "b ratio = b·tp·pp / b(tp1); a ratio = a·tp·pp / that of tp2pp2. analytic: default "
            "`tp_efficiency` (fitted); legacy: `efficiency_decay=0.05`.", "",
            "| layout | b published | b analytic | b legacy | a published | a analytic | a legacy |",
            "|---|---|---|---|---|---|---|"]
    for r in res["efficiency_fit"]:
        out.append(f"| {r['layout']} | " + " | ".join(
            f"{r[f'{t}_ratio_{n}']:.3f}" for t in ("b", "a") for n in ("published", "analytic", "legacy")) + " |")
    out += ["", "## llama-7b throughput at 4,096 tokens (ZeRO-1 over 8 GPUs)", "",
            "| hardware | layout | tokens/s/GPU | MFU |", "|---|---|---|---|"]
    for r in res["throughput_7b"]:
        out.append(f"| {r['hardware']} | {r['layout']} | {r['tokens_per_s_per_gpu']:,.0f} | {100 * r['mfu']:.1f} % |")
    lat = res["latency"]
    out += ["", "## Pricing latency", "",
            f"resolve a layout: {lat['resolve_us']:.1f} µs; cached cost(): {lat['cached_us']:.2f} µs; "
            f"seconds() over {lat['num_lengths']} lengths: {lat['seconds_all_lengths_us']:.0f} µs"]
    if res.get("calibration"):
        c = res["calibration"]
        out += ["", f"## Calibration of `tiny` on this CPU ({c['device']})", "",
                f"{c['wall_seconds']:.1f} s, R² = {c['r2']:.4f}; calibrated a={c['calibrated']['a']:.3g}, "
                f"b={c['calibrated']['b']:.3g}, c={c['calibrated']['c']:.3g}; analytic `cpu` preset "
                f"a={c['analytic_cpu_preset']['a']:.3g}, b={c['analytic_cpu_preset']['b']:.3g}; "
                "analytic / measured time: "
                + ", ".join(f"{s}: {c[f'ratio_analytic_over_measured_{s}']:.2f}" for s in (256, 1024, 2048))]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="code_kafka", metavar="PATH",
                   help="Parquet length file or bundled name (default code_kafka)")
    p.add_argument("--model", default="llama-13b")
    p.add_argument("--hardware", default="a100-80g")
    p.add_argument("--num-ranks", type=int, default=64)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--no-calibrate", action="store_true", help="skip the CPU calibration (about 5 s)")
    p.add_argument("--out-dir", default=str(RESULTS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lengths = read_lengths(args.lengths)
    res: dict[str, Any] = {
        "lengths": str(args.lengths), "model": args.model, "hardware": args.hardware,
        "num_ranks": args.num_ranks, "zero_stage": args.zero_stage,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "load": [round(x, 2) for x in os.getloadavg()],
        "analytic": analytic_table(args, lengths),
        "hydraulis": hydraulis_comparison(lengths),
        "efficiency_fit": efficiency_fit(),
        "throughput_7b": throughput_7b(),
        "latency": pricing_latency(lengths),
        "calibration": None if args.no_calibrate else calibration(),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cost_model.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out_dir / "cost_model.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
