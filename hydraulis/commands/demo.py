"""``hydraulis demo``: profile → plan → simulate → a real balanced training run, on bundled data."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import DEFAULT_TOKENS_PER_STEP, LengthInput, output_dir, positive_int
from .plan import Planned, PlanOptions, generate, print_header, print_pool
from .simulate import headline, run_simulation

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from balancer.cost import CostModel
    from balancer.profile import LengthProfile
    from hydraulis.config import JobConfig

HELP = "the whole pipeline on bundled data, then a short real training run"
DESCRIPTION = """\
Four stages on a bundled real length distribution (default: code_kafka, the token counts
of every source file of Apache Kafka):

  1. profile  — length histogram, quantiles, and where the attention time goes;
  2. plan     — candidate parallel strategies for a target cluster and model
                (default 16xH100, llama-7b; analytic cost model);
  3. simulate — the balancer against every baseline on the same global batches;
  4. train    — a real run of the reference GPT on CPU processes (gloo) through the
                BalancedDataLoader and the runtime, next to a baseline on the same
                batches; measured step times, tokens/s and the losses of both.

Artifacts go to --out (profile.json, length_histogram.png, time_share.png,
candidates.json, simulation.json, simulation.png, training.json). --quick runs smaller
settings (CI smoke test)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="hydraulis-demo", metavar="DIR", help="artifact folder (default: hydraulis-demo)")
    p.add_argument("--quick", action="store_true", help="smaller settings everywhere (a ~30 s smoke run)")
    p.add_argument("--data", default="code_kafka", help="bundled length file (default: code_kafka)")
    g = p.add_argument_group("stages 2-3: the target cluster (estimates)")
    g.add_argument("--cluster", default="16xH100", help="cluster preset or file (default: 16xH100)")
    g.add_argument("--model", default="llama-7b", help="model preset or file (default: llama-7b)")
    g.add_argument("--tokens-per-step", type=positive_int, default=DEFAULT_TOKENS_PER_STEP, metavar="N",
                   help=f"tokens per global batch (default: {DEFAULT_TOKENS_PER_STEP:,})")
    g.add_argument("--steps", type=positive_int, metavar="N", help="simulated steps (default: 20; --quick: 8)")
    t = p.add_argument_group("stage 4: the real CPU run")
    t.add_argument("--ranks", type=int, default=2, choices=(1, 2, 3, 4), help="processes (default: 2)")
    t.add_argument("--train-steps", type=positive_int, metavar="N", help="steps per run (default: 6; --quick: 3)")
    t.add_argument("--train-max-length", type=positive_int, metavar="L",
                   help="cap on sequence length, tokens (default: 2048; --quick: 1024)")
    t.add_argument("--train-tokens-per-step", type=positive_int, metavar="N",
                   help="tokens per global batch (default: 16384; --quick: 8192)")
    t.add_argument("--compare", default="multipack", metavar="POLICY",
                   help="baseline trained side by side on the same batches (default: multipack; 'none' to skip)")
    t.add_argument("--no-train", action="store_true", help="stop after the simulation")
    p.add_argument("--seed", type=int, default=0)


def _processes(n: int) -> str:
    return f"{n} CPU process" + ("es" if n != 1 else "")


def _stage(k: int, title: str) -> float:
    print(f"\n── [{k}/4] {title} " + "─" * max(0, 60 - len(title)), flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """The demo's sizes after --quick and the explicit flags are applied."""

    sim_steps: int
    train_steps: int
    train_max_length: int
    train_tokens_per_step: int
    compare: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoSettings":
        from balancer.baselines import BASELINES

        compare = None if args.compare.lower() == "none" else args.compare
        if compare is not None and compare not in BASELINES:
            raise ValueError(f"--compare {compare!r} is not a baseline; choose one of {', '.join(BASELINES)} or none")
        if compare == "wlb_llm":
            raise ValueError("--compare wlb_llm moves sequences between steps, so its batches differ; compare another")
        q = args.quick
        return cls(
            sim_steps=args.steps or (8 if q else 20),
            train_steps=args.train_steps or (3 if q else 6),
            train_max_length=args.train_max_length or (1024 if q else 2048),
            train_tokens_per_step=args.train_tokens_per_step or (8192 if q else 16384),
            compare=compare,
        )


def run(args: argparse.Namespace) -> int:
    import json

    from balancer.data import bundled_names, read_lengths
    from hydraulis.config import load_job

    if args.data not in bundled_names():
        raise ValueError(f"--data {args.data!r} is not a bundled length file; choose one of {', '.join(bundled_names())}")
    settings = DemoSettings.from_args(args)
    out = output_dir(args.out)
    job = load_job(model=args.model, cluster=args.cluster)
    assert job.cluster is not None and job.model is not None and job.hardware is not None
    cost = job.cost_model()
    started = time.perf_counter()

    lengths = read_lengths(args.data)
    print(f"hydraulis demo — data {args.data} ({lengths.size:,} real documents), artifacts in {out}/")
    print(f"target: {job.cluster.num_ranks} × {job.hardware.name}, {job.model.name}; "
          f"{args.tokens_per_step:,} tokens per step ({args.tokens_per_step // job.cluster.num_ranks:,} per rank); "
          f"{settings.sim_steps} simulated steps")
    if not args.no_train:
        print(f"real run: {_processes(args.ranks)}, {settings.train_steps} steps × "
              f"{settings.train_tokens_per_step:,} tokens, lengths capped at {settings.train_max_length:,}"
              + (f", next to {settings.compare}" if settings.compare else ""))

    t0 = _stage(1, f"profile {args.data}")
    prof = _profile_stage(args.data, lengths, job, cost, out)
    _done(t0)

    t0 = _stage(2, f"plan candidates for {args.cluster}, {job.model.name}")
    lengths_input = LengthInput(profile=prof, lengths=lengths, label=args.data)
    planned = _plan_stage(lengths_input, job, cost, out, args)
    _done(t0)

    t0 = _stage(3, "simulate the balancer against every baseline")
    result = run_simulation(lengths_input, cost, job.cluster, planned.pool, out, tokens_per_step=args.tokens_per_step,
                            steps=settings.sim_steps, max_length=planned.max_length, seed=args.seed)
    print(result.summary_table())
    for line in headline(result):
        print(line)
    _done(t0)

    training: dict[str, Any] | None = None
    if not args.no_train:
        t0 = _stage(4, f"train the reference GPT on {_processes(args.ranks)}")
        training = _train(args, settings)
        (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
        _print_training(training, settings.compare)
        _done(t0)

    print("\n══ summary " + "═" * 58)
    bal = result.traces["balancer"].summary()
    best = result.best_baseline()
    assert best is not None
    print(f"estimate, {job.cluster.num_ranks} × {job.hardware.name}, {job.model.name}: balancer "
          f"{bal['tokens_per_second']:,.0f} tokens/s — {result.speedup()[best]:.2f}× the best baseline ({best}), "
          f"imbalance {bal['mean_imbalance']:.3f} vs {result.traces[best].summary()['mean_imbalance']:.3f}")
    if training is not None:
        for line in _training_summary(training, settings.compare):
            print(line)
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".png"))
    print(f"artifacts in {out}/: {', '.join(files)}")
    print(f"total {time.perf_counter() - started:.0f} s. Next: docs/quickstart.md "
          "(hydraulis profile YOUR_DATA, then plan and simulate on your cluster)")
    return 0


def _profile_stage(name: str, lengths: "np.ndarray", job: "JobConfig", cost: "CostModel", out: Path) -> "LengthProfile":
    """Profile JSON + plots; prints the quantiles and the long tail's share of time."""
    from balancer.profile import LengthProfile
    from hydraulis.plots import doubling_shares, plot_length_histogram, plot_time_share

    assert job.model is not None and job.hardware is not None
    smallest = _fitting_layouts(cost)[0]  # the time share needs one layout's a, b
    c = cost.cost(smallest)
    cost_label = f"{job.model.name} on {job.hardware.name}, {smallest.name}"
    prof = LengthProfile.from_lengths(lengths, source=name, time_share={"cost": cost_label, "a": c.a, "b": c.b, "d": c.d})
    prof.save(out / "profile.json")
    shares = doubling_shares(prof, c.a, c.b, c.d)
    plot_length_histogram(prof, out / "length_histogram.png")
    plot_time_share(shares, out / "time_share.png", cost_label)
    q = prof.quantiles
    print(f"{prof.num_sequences:,} sequences, {prof.total_tokens:,} tokens; mean {prof.mean_length:,.0f}, "
          f"median {q['p50']:,}, p90 {q['p90']:,}, p99 {q['p99']:,}, max {prof.max_length:,}")
    long_cut = 1 << int(q["p90"]).bit_length()
    seq, tok, tim = shares.above(long_cut)
    print(f"sequences of {long_cut:,}+ tokens: {100 * seq:.1f}% of sequences, {100 * tok:.1f}% of tokens, "
          f"{100 * tim:.1f}% of the estimated time ({cost_label})")
    return prof


def _plan_stage(lengths_input: LengthInput, job: "JobConfig", cost: "CostModel", out: Path,
                args: argparse.Namespace) -> Planned:
    """Candidate pool for the target cluster; prints the layouts and candidates, writes the JSON."""
    from balancer.pool import save_candidates

    assert job.cluster is not None and job.model is not None and job.hardware is not None
    opts = PlanOptions(tokens_per_step=args.tokens_per_step, num_candidates=6, seed=args.seed)
    planned = generate(lengths_input, cost, job.cluster, opts)
    print_header(lengths_input, cost, job.cluster, job, f"analytic: {job.model.name} on {job.hardware.name}",
                 planned, args.tokens_per_step)
    print_pool(planned.pool, args.tokens_per_step, cost.time_unit, cost)
    save_candidates(planned.pool, out / "candidates.json")
    return planned


def _fitting_layouts(cost: Any) -> list[Any]:
    from strategies.layout import Layout

    out = []
    for tp in (1, 2, 4, 8):
        lay = Layout(tp=tp)
        if cost.supports(lay):
            out.append(lay)
    if not out:
        raise ValueError("the model fits no layout up to tp8 on this hardware; pick a smaller --model")
    return out


def _train(args: argparse.Namespace, settings: DemoSettings) -> dict[str, Any]:
    """The real run on ``args.ranks`` local gloo processes; rank 0's records."""
    from strategies.runtime import run_local

    from .demo_train import TrainConfig, train_rank

    top = settings.train_max_length
    cfg = TrainConfig(data=args.data, max_length=top, tokens_per_step=settings.train_tokens_per_step,
                      steps=settings.train_steps, micro_batch_tokens=2 * top, compare=settings.compare, seed=args.seed,
                      calibration_lengths=tuple(sorted({max(64, top * k // 8) for k in (1, 4, 16)})))
    results = run_local(train_rank, args.ranks, (cfg,), timeout_s=600.0, collective_timeout_s=120.0)
    out = results[0]
    assert out is not None
    return out


def _median_after_first(values: list[float]) -> float:
    import numpy as np

    v = values[1:] if len(values) > 1 else values
    return float(np.median(v))


def _waits(records: list[dict[str, Any]]) -> list[float]:
    """Per step, the fastest rank's wait for the slowest in the compute phase: ``1 − fastest /
    slowest`` of the ranks' CPU seconds (0 = perfectly balanced)."""
    return [1.0 - r["compute_min"] / max(r["compute_max"], 1e-12) for r in records]


def _spread(values: list[float], fmt: str, unit: str) -> str:
    """``median unit (steps min–max unit)``: the median over steps and the spread around it."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return (f"{format(float(np.median(v)), fmt)}{unit} (steps {format(float(v.min()), fmt)}–"
            f"{format(float(v.max()), fmt)}{unit})")


def _print_training(training: dict[str, Any], compare: str | None) -> None:
    from ._common import format_table

    cm = training["cost_model"]
    print(f"{training['world_size']} ranks, reference GPT with {training['parameters']:,} parameters; measured "
          f"cost t(s) = {cm['a']:.3g}·s² + {cm['b']:.3g}·s + {cm['c']:.3g} s (R² {cm['r2']:.3f}); "
          f"candidates: {', '.join(training['candidates'])}")
    bal = training["runs"]["balancer"]
    base = training["runs"].get(compare) if compare else None
    headers = ["step", "tokens", "est.", "slowest rank", "fastest", "step", "loss"]
    if base:
        headers += [f"{compare}: slowest", "fastest", "step", "loss"]
    rows = []
    for i, r in enumerate(bal):
        row = [r["step"], f"{r['tokens']:,}", f"{r['est_seconds']:.3f}", f"{r['compute_max']:.3f}",
               f"{r['compute_min']:.3f}", f"{r['step_seconds']:.3f}", f"{r['loss']:.4f}"]
        if base:
            b = base[i]
            row += [f"{b['compute_max']:.3f}", f"{b['compute_min']:.3f}", f"{b['step_seconds']:.3f}", f"{b['loss']:.4f}"]
        rows.append(row)
    print("seconds per step: est. = the plan's estimate; slowest/fastest rank = forward + backward in the rank's CPU "
          "time (one thread per rank); step = wall time of the whole optimizer step")
    print(format_table(headers, rows))


def _training_summary(training: dict[str, Any], compare: str | None) -> list[str]:
    """The measured lines. Rank compute is CPU time (one thread per rank): shared cores cannot
    invert it, so the waits and the slowest rank's compute reproduce on a loaded machine;
    wall times do not, and are labelled so."""
    bal = training["runs"]["balancer"]
    n = training["world_size"]
    steady = bal[1:] if len(bal) > 1 else bal  # the first step pays one-off allocations
    lines = [f"measured, {_processes(n)}, rank compute in CPU time: balancer — the fastest rank waits "
             f"{_spread([100 * w for w in _waits(steady)], '.1f', '%')} of the compute phase; the slowest rank computes "
             f"{_spread([r['compute_max'] for r in steady], '.3f', ' s')} per step (median; first step excluded)"]
    if compare and compare in training["runs"]:
        base = training["runs"][compare]
        b_steady = base[1:] if len(base) > 1 else base
        ratio = sum(r["compute_max"] for r in b_steady) / max(sum(r["compute_max"] for r in steady), 1e-12)
        diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(bal, base))
        lines.append(f"measured, {compare} on the same batches: the fastest rank waits "
                     f"{_spread([100 * w for w in _waits(b_steady)], '.1f', '%')}; the slowest rank computes "
                     f"{_spread([r['compute_max'] for r in b_steady], '.3f', ' s')}, {ratio:.2f}× the balancer's "
                     "(the step time of independent devices)")
        step = _median_after_first([r["step_seconds"] for r in bal])
        b_step = _median_after_first([r["step_seconds"] for r in base])
        lines.append(f"  wall clock, which depends on this machine's load: median step {step:.3f} s (balancer), "
                     f"{b_step:.3f} s ({compare})" + (
                         f"; {n} processes share the cores, so a waiting rank's core serves the others" if n > 1 else ""))
        lines.append(f"same global batches, exact gradients: the two runs' losses differ by at most {diff:.1e}")
    return lines
