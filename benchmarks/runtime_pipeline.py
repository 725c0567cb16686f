"""Pipeline benchmark: a pp2 replica's measured time against the planner's 1F1B estimate, on CPU.

    python benchmarks/runtime_pipeline.py --lengths PATH_OR_BUNDLED_NAME [--steps N] [--smoke]

Two gloo processes (one torch thread each) run :class:`strategies.runtime.Engine` with two
candidates on the same ranks: ``tp1pp2x1`` (one pipeline, stage 0 on rank 0, stage 1 on
rank 1) and ``tp1x2`` (two data-parallel replicas, the control). Every global batch —
real lengths (``--lengths``, capped at the model's maximum length) up to a token budget,
synthetic token ids — is planned by a :class:`balancer.selector.Balancer` for each
strategy and run under both, alternating which goes first.

**Clock: wall time, everywhere.** The bubble is time a stage waits for its neighbour, which
process CPU time leaves out, so a pipeline replica is timed with the wall clock (the
engine's ``rank_seconds``: forward + backward, waits included) — and so is everything it is
compared with: the calibration and the per-micro-batch stage times are taken on both ranks
at once, under the contention of a training step. Every number is a **median**: of a
micro-batch's timed runs, and of the per-step ratios.

**Calibration, per stage.** Every rank times forward + backward of the whole model and of
each pp2 stage (:func:`strategies.runtime.stage_forward`) on the packed micro-batches that
``hydraulis calibrate`` times (:func:`benchmarks.runtime_common.calibration_set`: one long
sequence, many short, long next to short, drawn from the length file), the parts
round-robin so a burst of load hits all of them alike; the ranks' mean of the medians is
fitted to ``Σ (a·s² + b·s + d) + c`` by non-negative least squares
(:meth:`balancer.cost.CostModel.fit`, R² reported). ``tp1`` gets the whole model's fit;
``tp1pp2`` the **busiest stage's** (per micro-batch the slower stage): the planner models a
pp layout as one stage's time per micro-batch with equal stages.

**Per step**, the pp2 replica's *measured* time (the slower rank's) is set against the
plan's estimate ``Σ_k T(m_k) + v·c + (pp − 1)·max_k T(m_k)`` (busiest-stage fit). Right
after the step, rank ``p`` times stage ``p``'s forward and backward on each of the step's
micro-batches, giving ``t_p(k)``; from these the *formula on measured times*
(:func:`balancer.layout_cost.replica_seconds` of ``t(k) = max_p t_p(k)``) and the *exact
1F1B replay* (:func:`simulate_1f1b`: the runtime's op lists, free point-to-point). So

    measured / planner = (formula / planner) · (replay / formula) · (measured / replay)

— the stage fit's error on these micro-batches, the closed formula's error against the
real schedule, and what the runtime adds (point-to-point, Python, load drift). The
control's ``measured / estimate`` carries the same calibration and the same load a moment
apart; the **quotient** of the two ratios, per step, is the pipeline model's own error.

Results: ``benchmarks/results/runtime_pipeline.json`` and ``.md`` (``--smoke``: a temporary
folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script from a source checkout: the repo root first, and not this folder, whose
# packers.py would shadow the packers package (also when PYTHONPATH already names the root).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from balancer.calibrate import measure  # noqa: E402
from balancer.cost import CostModel, LayoutCost  # noqa: E402
from balancer.data import read_lengths  # noqa: E402
from balancer.layout_cost import replica_seconds  # noqa: E402
from balancer.selector import Balancer, BalancerConfig  # noqa: E402
from benchmarks.runtime_common import calibration_set, fit_summary, global_batches, pack  # noqa: E402
from strategies import ClusterSpec, Layout, Strategy  # noqa: E402
from strategies.runtime import (  # noqa: E402
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    StageSpec,
    check_micro_batch,
    split_layers,
    prepare_micro_batch,
    run_local,
    stage_forward,
)
from strategies.stages import simulate_1f1b  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PP2, TP1 = Layout(1, 1, 2), Layout(1)
CPU = torch.device("cpu")

SETTINGS: dict[str, Any] = {
    "model": dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=256),
    "max_length": 512, "tokens_per_step": 4096, "micro_batch_tokens": 1024,
    "calibration_repeats": 3, "stage_repeats": 3, "steps": 14, "warmup": 2,
}
SMOKE: dict[str, Any] = {
    "model": dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128),
    "max_length": 128, "tokens_per_step": 512, "micro_batch_tokens": 256,
    "calibration_repeats": 1, "stage_repeats": 1, "steps": 2, "warmup": 1,
}
TARGETS = {"pipeline_model_error": (0.9, 1.1), "formula_over_replay": (1.0, 1.1), "measured_over_replay": (0.9, 1.15)}
"""Expected ranges (see :func:`markdown`'s statement of why)."""


# -- timing one rank's parts ----------------------------------------------------------------------
class Parts:
    """Forward and backward of the whole model (``spec=None``) or of one pipeline stage on a
    packed micro-batch, on this rank's own model (no engine, no communication)."""

    def __init__(self, cfg: ModelConfig) -> None:
        torch.manual_seed(0)
        self.cfg, self.model = cfg, GPT(cfg)

    def batch(self, lens: tuple[int, ...]) -> Any:
        total = int(sum(lens))
        mb = pack(list(lens), self.cfg.vocab_size, np.random.default_rng(total), total - len(lens))
        return prepare_micro_batch(check_micro_batch(mb, 0, self.cfg.vocab_size), SINGLE_DEVICE, CPU)

    def run(self, spec: StageSpec | None, batch: Any) -> tuple[float, float]:
        """Wall seconds of the forward and of the backward."""
        rows = int(batch.input_ids.shape[0])
        x = None if spec is None or spec.first else torch.randn(rows, self.cfg.hidden_size, requires_grad=True)
        t0 = time.perf_counter()
        y = self.model(batch) if spec is None else stage_forward(self.model, spec, batch, SINGLE_DEVICE, x)
        t1 = time.perf_counter()
        grad = None if spec is None or spec.last else torch.ones_like(y)
        t2 = time.perf_counter()
        y.backward(grad)
        t3 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        return t1 - t0, t3 - t2


def calibrate(parts: Parts, specs: list[StageSpec | None], mbs: list[tuple[int, ...]], repeats: int) -> np.ndarray:
    """Median wall seconds (specs × micro-batches) of forward + backward, ``repeats`` rounds after
    a warm-up round; within a round every spec is timed (``balancer.calibrate.measure``) in turn."""
    batches = {mb: parts.batch(mb) for mb in mbs}
    rounds = [[measure(lambda mb, spec=spec: parts.run(spec, batches[mb]), mbs, device=CPU, warmup=0, repeats=1,
                       clock="wall", progress=False).seconds for spec in specs] for _ in range(repeats + 1)]
    return np.median(np.array(rounds[1:]), axis=0)


def time_stage(parts: Parts, spec: StageSpec, micro_batches: list[list[int]], repeats: int) -> np.ndarray:
    """Median wall seconds ``[forward, backward] × micro-batch`` of one stage on a step's micro-batches."""
    batches = [parts.batch(tuple(mb)) for mb in micro_batches]
    runs = np.array([[parts.run(spec, b) for b in batches] for _ in range(repeats)])  # (repeats, v, 2)
    return np.median(runs, axis=0).T


def formula_seconds(forward: np.ndarray, backward: np.ndarray) -> float:
    """The planner's replica formula on measured stage times: ``T(k) = max_p (forward + backward)``."""
    per_mb = (np.asarray(forward) + np.asarray(backward)).max(axis=0)
    return replica_seconds(per_mb, 0.0, len(forward))


# -- one rank ---------------------------------------------------------------------------------------
def run_rank(rank: int, world: int, env: dict[str, Any], lengths: np.ndarray) -> dict[str, Any] | None:
    cfg = ModelConfig(**env["model"])
    cap = int(env["micro_batch_tokens"])
    parts = Parts(cfg)
    stages = [StageSpec.of(cfg, PP2, p) for p in range(2)]
    cal = calibration_set(lengths, env["max_length"], cap)
    seconds = torch.tensor(calibrate(parts, [None, *stages], cal, env["calibration_repeats"]), dtype=torch.float64)
    dist.all_reduce(seconds)  # every rank timed every part at once; their mean
    seconds = (seconds / world).numpy()
    busiest = seconds[1:].max(axis=0)
    planner = CostModel.fit_layouts({TP1: (cal, seconds[0]), PP2: (cal, busiest)}, token_capacity=cap)
    stage_fits = [CostModel.fit(cal, s, token_capacity=cap) for s in seconds[1:]]
    t1 = planner.cost(TP1)
    naive = LayoutCost(a=t1.a / 2, b=t1.b / 2, c=t1.c, d=t1.d / 2, token_capacity=cap)

    cluster = ClusterSpec(num_ranks=world, ranks_per_node=world)
    strategies = {"tp1pp2x1": Strategy.homogeneous(PP2, world), "tp1x2": Strategy.homogeneous(TP1, world)}
    balancers = {n: Balancer(cluster, [s], planner, BalancerConfig(seed=0)) for n, s in strategies.items()}
    engine = Engine(list(strategies.values()), cfg, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
                    config=EngineConfig(clock=time.perf_counter))  # wall: the bubble is waiting
    batches = global_batches(np.minimum(lengths, env["max_length"]), env["tokens_per_step"],
                             env["warmup"] + env["steps"], seed=0)
    rows: list[dict[str, Any]] = []
    for k, lens in enumerate(batches):
        glt, warm = int((lens - 1).sum()), k < env["warmup"]
        for name in (list(strategies) if k % 2 == 0 else list(reversed(strategies))):
            plan = balancers[name].plan(lens, step=k)
            mine = [[int(lens[i]) for i in mb] for mb in plan.for_rank(rank).micro_batches]
            rng = np.random.default_rng(k)
            result = engine.step(plan, [pack(mb, cfg.vocab_size, rng, glt) for mb in mine])
            row = {"step": k, "warmup": warm, "strategy": name, "tokens": int(lens.sum()), "replicas": [
                {"ranks": list(rep.ranks), "micro_batches": [[int(lens[i]) for i in mb] for mb in rep.micro_batches],
                 "estimate_s": rep.est_seconds, "measured_s": max(result.rank_seconds[r] for r in rep.ranks)}
                for rep in plan.replicas]}
            if name == "tp1pp2x1" and not warm:  # rank p times stage p on the step's micro-batches, at once
                mine_t = torch.tensor(time_stage(parts, stages[plan.for_rank(rank).pp_rank], mine,
                                                 env["stage_repeats"]))
                every = [torch.empty_like(mine_t) for _ in range(world)]
                dist.all_gather(every, mine_t)
                _pipeline_row(row["replicas"][0], np.stack([t.numpy() for t in every]), naive)
            rows.append(row)
    if rank != 0:
        return None
    return {"fits": {"tp1": fit_summary(planner, TP1), "stage0": fit_summary(stage_fits[0]),
                     "stage1": fit_summary(stage_fits[1]), "busiest (tp1pp2)": fit_summary(planner, PP2)},
            "calibration_micro_batches": [list(mb) for mb in cal],
            "calibration_seconds": {"tp1": seconds[0].tolist(), "stage0": seconds[1].tolist(),
                                    "stage1": seconds[2].tolist()},
            "rows": rows}


def _pipeline_row(entry: dict[str, Any], times: np.ndarray, naive: LayoutCost) -> None:
    """Add the pp2 replica's stage times (``times``: stage × [forward, backward] × micro-batch) and
    the estimates made from them to its row ``entry``."""
    fwd, bwd = times[:, 0], times[:, 1]
    naive_t = [float(naive.seconds(np.array(mb)).sum()) for mb in entry["micro_batches"]]
    entry.update(stage_forward_s=fwd.tolist(), stage_backward_s=bwd.tolist(),
                 formula_s=formula_seconds(fwd, bwd), replay_s=simulate_1f1b(fwd, bwd),
                 naive_s=replica_seconds(naive_t, naive.c, 2),
                 stage_imbalance=float((fwd[1] + bwd[1]).sum() / (fwd[0] + bwd[0]).sum()))


# -- report ---------------------------------------------------------------------------------------
def per_step(res: dict[str, Any]) -> list[dict[str, float]]:
    """The timed steps' ratios: pp2 against its estimates, the control, and their quotient."""
    out = []
    timed = [r for r in res["rows"] if not r["warmup"]]
    for k in sorted({r["step"] for r in timed}):
        by = {r["strategy"]: r for r in timed if r["step"] == k}
        e = by["tp1pp2x1"]["replicas"][0]
        reps = [x for x in by["tp1x2"]["replicas"] if x["estimate_s"] > 0]
        control = sum(x["measured_s"] for x in reps) / sum(x["estimate_s"] for x in reps)
        pp2 = e["measured_s"] / e["estimate_s"]
        out.append({"step": k, "micro_batches": len(e["micro_batches"]), "pp2_measured_over_planner": pp2,
                    "control_measured_over_estimate": control, "pipeline_model_error": pp2 / control,
                    "formula_over_planner": e["formula_s"] / e["estimate_s"],
                    "formula_over_replay": e["formula_s"] / e["replay_s"],
                    "measured_over_replay": e["measured_s"] / e["replay_s"],
                    "pp2_measured_over_naive": e["measured_s"] / e["naive_s"],
                    "stage_imbalance": e["stage_imbalance"], "measured_s": e["measured_s"],
                    "planner_s": e["estimate_s"]})
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    steps = per_step(res)
    out: dict[str, Any] = {"timed_steps": len(steps)}
    for key in steps[0]:
        if key != "step":
            xs = [s[key] for s in steps]
            out[key] = float(np.median(xs))
            out[key + "_range"] = [float(min(xs)), float(max(xs))]
    out["within_target"] = {k: lo <= out[k] <= hi for k, (lo, hi) in TARGETS.items()}
    return out


def markdown(res: dict[str, Any]) -> str:
    s, m, info, env = res["summary"], res["settings"]["model"], res["machine"], res["settings"]
    f = res["result"]["fits"]
    s0, s1 = split_layers(ModelConfig(**m), PP2)
    head = (
        f"Pipeline benchmark on **{info['cpu']}** ({info['cpus']} cores, load {info['load']}), torch "
        f"{info['torch']}, {res['date']}. Command: `{res['command']}`. Lengths: {res['lengths']} capped at "
        f"{env['max_length']} tokens, {env['tokens_per_step']:,} tokens per step, "
        f"{env['micro_batch_tokens']:,} per micro-batch. Model: hidden {m['hidden_size']}, "
        f"{m['num_layers']} layers (pp2: blocks {s0.start}–{s0.stop - 1} + embedding | "
        f"blocks {s1.start}–{s1.stop - 1} + final norm + LM head), vocab {m['vocab_size']}, "
        f"ffn {m['ffn_hidden_size']}. Two gloo processes, one thread each; pp2 (one pipeline) and tp1×2 (the "
        "control) run the same batches, alternating. All times are **wall time** (the bubble is waiting), taken "
        "on both ranks at once. Costs calibrated here on "
        f"{len(res['result']['calibration_micro_batches'])} packed micro-batches (`hydraulis calibrate`'s "
        f"compositions, median of {env['calibration_repeats']} runs), whole model and each stage, fitted to "
        "Σ (a·s² + b·s + d) + c; the planner prices pp2 with the busiest stage's fit. After each pp2 step each "
        f"rank times its stage's forward and backward on the step's micro-batches (median of {env['stage_repeats']})."
        f" Medians over {s['timed_steps']} timed steps (range in brackets)."
    )

    def row(label: str, key: str, expected: str, bold: bool = False) -> str:
        lo, hi = s[key + "_range"]
        v = f"**{s[key]:.2f}**" if bold else f"{s[key]:.2f}"
        return f"| {label} | {v} ({lo:.2f}–{hi:.2f}) | {expected} |"

    ok = s["within_target"]
    mark = {k: "met" if v else "**missed**" for k, v in ok.items()}
    lines = [
        head, "",
        "| quantity | value | expected |",
        "|---|---|---|",
        row("pp2 measured / planner estimate `Σ T + v·c + (pp−1)·max T`", "pp2_measured_over_planner",
            "≈ the control's"),
        row("tp1×2 measured / estimate (control: same calibration, same batch, adjacent in time)",
            "control_measured_over_estimate", "≈ 1 on a quiet machine"),
        row("**pipeline model error** = the two ratios' quotient per step", "pipeline_model_error",
            f"0.9–1.1 ({mark['pipeline_model_error']})", bold=True),
        row("  ↳ stage calibration: formula on measured stage times / planner estimate", "formula_over_planner",
            "≈ 1"),
        row("  ↳ **formula / exact 1F1B replay**, both on the measured per-micro-batch stage times",
            "formula_over_replay", f"1.0–1.1 ({mark['formula_over_replay']})", bold=True),
        row("  ↳ measured / exact 1F1B replay (point-to-point, Python, load drift)", "measured_over_replay",
            f"0.9–1.15 ({mark['measured_over_replay']})"),
        row("pp2 measured / naive estimate (tp1 fit ÷ pp, LM head ignored)", "pp2_measured_over_naive",
            "> 1 (the head)"),
        row("stage imbalance Σ t₁ / Σ t₀, measured (the last stage runs the LM head)", "stage_imbalance", "> 1"),
        f"| pp2 micro-batches per step | {s['micro_batches']:.0f} | |",
        f"| pp2 measured s / planner s | {s['measured_s']:.4f} / {s['planner_s']:.4f} | |",
        "",
        "Per step, `pp2 measured / planner = (formula / planner) · (replay / formula) · (measured / replay)`.",
        "",
        "**Expected, and why.** The control shares the calibration and, a moment apart, the machine's load, so "
        "the quotient cancels both and leaves what the pipeline adds: the bubble formula and the stage "
        "exchanges — expected 1 within noise (0.9–1.1). The closed formula is exact for equal micro-batches on "
        "equal stages; for unequal ones it errs both ways — it charges the whole bubble at the largest "
        "micro-batch (pessimistic) but not the stalls 1F1B's alternation takes when a long micro-batch meets "
        "short ones (optimistic): over random pp2 orders with forward ⅓, backward ⅔, formula / replay spans "
        "0.70–1.17. Expected ≈ 1 (0.9–1.1) on the planner's micro-batches. Measured / replay should be near 1 "
        "(0.9–1.15): a 1,024-token activation (hidden 128, fp32) is 0.5 MiB, sent through gloo on one "
        "host — small against a stage's compute. Each measured / estimate on its own also carries how the "
        "machine's load changed between the calibration and the step; read it only next to the control.",
        "",
        "Fits (seconds; per micro-batch Σ (a·s² + b·s + d) + c): "
        + "; ".join(f"{k} a={v['a']:.3g} b={v['b']:.3g} d={v['d']:.3g} c={v['c']:.3g} (R² {v['r2']:.3f})"
                    for k, v in f.items()) + ".",
        "",
        "| step | micro-batches | pp2 measured / planner | control | quotient | formula / replay "
        "| measured / replay |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['step']} | {r['micro_batches']} | {r['pp2_measured_over_planner']:.2f} | "
          f"{r['control_measured_over_estimate']:.2f} | {r['pipeline_model_error']:.2f} | "
          f"{r['formula_over_replay']:.3f} | {r['measured_over_replay']:.2f} |" for r in per_step(res["result"])),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="code_kafka", help="bundled length file name or a Parquet path")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps per strategy (default {SETTINGS['steps']})")
    p.add_argument("--smoke", action="store_true", help="tiny model, two steps: check the script runs")
    p.add_argument("--out-dir", default=None,
                   help=f"where to write (default {RESULTS.relative_to(ROOT)}; with --smoke a temporary folder)")
    args = p.parse_args()
    env = dict(SMOKE if args.smoke else SETTINGS)
    if args.steps is not None:
        env["steps"] = args.steps
    t0 = time.perf_counter()
    lengths = read_lengths(args.lengths)
    result = run_local(run_rank, 2, (env, lengths), timeout_s=1800, collective_timeout_s=600)[0]
    res: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "lengths": args.lengths, "settings": env,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__},
        "result": result, "wall_s": time.perf_counter() - t0,
    }
    res["summary"] = summarise(result)
    out = Path(args.out_dir or (Path(tempfile.gettempdir()) / "hydraulis-pipeline-smoke" if args.smoke else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_pipeline.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "runtime_pipeline.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / 'runtime_pipeline.md'} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
