"""Cost-model benchmark: analytic coefficients per layout, a check against Hydraulis's
published 13B coefficients, pricing latency, and a CPU calibration.

    python benchmarks/cost_model.py --lengths PATH_OR_BUNDLED_NAME [--model llama-13b]
                                    [--hardware a100-80g] [--num-ranks 64] [--zero-stage 1]
                                    [--no-calibrate] [--no-measure]

1. **Analytic table** — for every layout (tp ≤ 8, cp ≤ 4, pp ≤ 4, at most ``--num-ranks``
   ranks): ``a``, ``b`` (compute and communication parts), ``c``, ``d``, token capacity and
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
   ``a100-80g``, ``h100-80g`` and ``h200`` (ZeRO-1 over 8) for tp = 1, 2, 4, 8.
3. **Pricing latency** — a first ``cost(layout)`` (resolving) and cached lookups, and
   ``seconds(lengths, layout)`` over the whole length file.
4. **Calibration** — ``CostModel.calibrate("tiny")`` on this CPU (one thread, CPU-time
   clock) on packed micro-batches drawn from the length file too: ``a, b, c, d``, every
   micro-batch measured vs fitted, and the same timings fitted *without* the packed ones
   (single sequences only, ``d`` = 0, as calibration did before) to show what the
   per-sequence term buys on micro-batches of many short sequences; next to the analytic
   ``tiny`` on the ``cpu`` preset.
5. **Measured plans** — ``hydraulis measure`` on this CPU: ``tiny`` on 4 replicas, the
   length file, 16K tokens per step, 2 steps, micro-batches of at most 1,024 tokens, the
   balancer and three baselines; every replica run on the CPU, the fastest of 2 runs per
   micro-batch. Measured step time, imbalance and estimate/measured per replica (a
   shared CPU is noisy: the H200 figures are in ``docs/cost_model.md``).

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
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

from balancer.analytic import AnalyticModel  # noqa: E402
from balancer.analytic_options import AnalyticOptions  # noqa: E402
from balancer.calibrate import CalibrationWarning  # noqa: E402
from balancer.cost import CostModel  # noqa: E402
from balancer.data import read_lengths  # noqa: E402
from balancer.fit import fit_quadratic  # noqa: E402
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
    for hw in ("a100-80g", "h100-80g", "h200"):
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


def calibration(lengths: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # the verdict is reported below
        model = CostModel.calibrate("tiny", repeats=5, num_threads=1, clock="process", progress=False,
                                    length_pool=lengths)
    wall = time.perf_counter() - t0
    cal = model.cost(Layout())
    ana = CostModel.analytic("tiny", "cpu").cost(Layout())
    meta = model.meta
    mbs = [tuple(mb) for mb in meta["micro_batches"]]
    measured = np.asarray(meta["seconds"])
    single = [k for k, mb in enumerate(mbs) if len(mb) == 1]
    old = fit_quadratic([mbs[k] for k in single], measured[single])  # what single-sequence calibration knew
    rows = []
    for k, (label, mb) in enumerate(zip(meta["labels"], mbs)):
        rows.append({"label": label, "sequences": len(mb), "tokens": sum(mb), "measured": float(measured[k]),
                     "fitted": cal.micro_batch_seconds(mb),
                     "single_sequence_fit": float(old.predict([mb])[0])})
    out = {"wall_seconds": wall, "r2": model.fit_r2(Layout()), "device": meta["device"],
           "reliable": meta["reliable"], "problems": meta["problems"], "calibrated": cal.to_dict(),
           "single_sequence_fit": {"a": old.a, "b": old.b, "c": old.c, "r2": old.r2},
           "analytic_cpu_preset": ana.to_dict(), "micro_batches": rows}
    for s in (256, 1024, 2048):
        out[f"ratio_analytic_over_measured_{s}"] = ana.micro_batch_seconds([s]) / cal.micro_batch_seconds([s])
    return out


def measured_plans(lengths_name: str) -> dict[str, Any]:
    """``hydraulis measure`` in-process on this CPU (its own output captured), its measured.json back."""
    import contextlib
    import io
    import tempfile

    from hydraulis.cli import main as hydraulis_main

    with tempfile.TemporaryDirectory() as tmp:
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            status = hydraulis_main([
                "measure", "--model", "tiny", "--cluster", "4xcpu", "--lengths", lengths_name,
                "--tokens-per-step", "16K", "--token-capacity", "1024", "--steps", "2", "--repeats", "3",
                "--run-repeats", "2", "--policies", "balancer,multipack,megatron_dp_balanced,hydraulis_random_restart",
                "--threads", "1", "--clock", "process", "--out", tmp,
            ])
        if status != 0:
            raise RuntimeError(f"hydraulis measure failed ({status}):\n{log.getvalue()}")
        got = json.loads((Path(tmp) / "measured.json").read_text())
    got["wall_seconds"] = time.perf_counter() - t0
    got.pop("plans")
    return got


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
           "| layout | a | b | b_tp | b_cp | b_pp | c | d | capacity | tok/s/dev p50 | tok/s/dev p99 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["analytic"]:
        if "unsupported" in r:
            out.append(f"| {r['layout']} | unsupported: {r['unsupported'][:80]} ||||||||||")
            continue
        out.append("| " + " | ".join(_fmt(r[k]) for k in (
            "layout", "a", "b", "b_tp", "b_cp", "b_pp", "c", "d", "token_capacity",
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
    out += ["", "## llama-7b throughput at 4,096 tokens (ZeRO-1 over 8 GPUs; h200: the measured preset)", "",
            "| hardware | layout | tokens/s/GPU | MFU |", "|---|---|---|---|"]
    for r in res["throughput_7b"]:
        out.append(f"| {r['hardware']} | {r['layout']} | {r['tokens_per_s_per_gpu']:,.0f} | {100 * r['mfu']:.1f} % |")
    lat = res["latency"]
    out += ["", "## Pricing latency", "",
            f"resolve a layout: {lat['resolve_us']:.1f} µs; cached cost(): {lat['cached_us']:.2f} µs; "
            f"seconds() over {lat['num_lengths']} lengths: {lat['seconds_all_lengths_us']:.0f} µs"]
    if res.get("calibration"):
        c = res["calibration"]
        k, o = c["calibrated"], c["single_sequence_fit"]
        out += ["", f"## Calibration of `tiny` on this CPU ({c['device']}), packed micro-batches", "",
                f"{c['wall_seconds']:.1f} s, R² = {c['r2']:.4f} ({'reliable' if c['reliable'] else 'UNRELIABLE'}); "
                f"a={k['a']:.3g}, b={k['b']:.3g}, c={k['c']:.3g}, d={k['d']:.3g}. The same timings fitted on "
                f"single sequences only (d = 0): a={o['a']:.3g}, b={o['b']:.3g}, c={o['c']:.3g}. "
                f"Analytic `cpu` preset a={c['analytic_cpu_preset']['a']:.3g}, b={c['analytic_cpu_preset']['b']:.3g}; "
                "analytic / measured time of one sequence: "
                + ", ".join(f"{s}: {c[f'ratio_analytic_over_measured_{s}']:.2f}" for s in (256, 1024, 2048)), "",
                "| micro-batch | seqs | tokens | measured ms | fit ms (a, b, c, d) | error | single-sequence fit ms | error |",
                "|---|---|---|---|---|---|---|---|"]
        for r in c["micro_batches"]:
            m = r["measured"]
            out.append(f"| {r['label']} | {r['sequences']} | {r['tokens']:,} | {1e3 * m:.2f} | {1e3 * r['fitted']:.2f} | "
                       f"{100 * (r['fitted'] - m) / m:+.1f}% | {1e3 * r['single_sequence_fit']:.2f} | "
                       f"{100 * (r['single_sequence_fit'] - m) / m:+.1f}% |")
    if res.get("measured"):
        m = res["measured"]
        out += ["", f"## Measured plans on this CPU (`hydraulis measure`, {m['wall_seconds']:.0f} s)", "",
                f"tiny on {m['cluster']['num_ranks']} replicas, {m['data']}, {m['tokens_per_step']:,} tokens per step, "
                f"{m['steps']} steps, micro-batches ≤ {m['token_capacity']:,} tokens; every replica run on the CPU "
                "(fastest of 2 runs per micro-batch).", "",
                "| policy | est. step s | measured step s | measured imbalance | est./measured per replica "
                "(median [min–max]) | median abs. error | balancer speedup (measured) |",
                "|---|---|---|---|---|---|---|"]
        for name, r in m["summary"].items():
            up = "—" if name == "balancer" else f"{r['reference_speedup']:.2f}×"
            out.append(f"| {name} | {r['est_step_seconds']:.4g} | {r['measured_step_seconds']:.4g} | "
                       f"{r['measured_imbalance']:.3f} | {r['ratio_median']:.3f} [{r['ratio_min']:.3f}–"
                       f"{r['ratio_max']:.3f}] | {100 * r['abs_error_median']:.1f}% | {up} |")
        out += ["", f"median |estimate/measured − 1| over all replicas: {100 * m['median_abs_error']:.1f}%"]
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
    p.add_argument("--no-calibrate", action="store_true", help="skip the CPU calibration (about 15 s)")
    p.add_argument("--no-measure", action="store_true", help="skip the measured plans on this CPU (about a minute)")
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
        "calibration": None if args.no_calibrate else calibration(lengths),
        "measured": None if args.no_measure else measured_plans(str(args.lengths)),
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
