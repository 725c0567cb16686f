"""``hydraulis measure``: run the plans of a few sampled steps on this device, replica by replica."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from strategies.kernels import KERNEL_CHOICES

from ._common import DEFAULT_TOKENS_PER_STEP, add_job_arguments, add_lengths_arguments, positive_int

if TYPE_CHECKING:  # pragma: no cover - typing only
    from balancer.measure import MeasuredPlan

HELP = "run sampled steps' plans on this device: measured step time, imbalance, estimate error"
DESCRIPTION = """\
What one device can learn about a cluster-sized plan. Builds the packed decoder of
--model (--layers N: an N-layer copy) on this device, calibrates the cost model on it
(packed micro-batches, as `hydraulis calibrate`), plans a few sampled global batches for
--cluster with the balancer and every baseline on that cost model (tp1 replicas: one
rank each), then runs every replica's micro-batches on this device, one replica after
another, as its rank would. Reports per policy the measured step time (slowest replica),
the measured imbalance (slowest over mean) and estimate/measured per replica.
Writes OUT/cost_model.json, OUT/plans.jsonl, OUT/measured.json and OUT/measured.md.

Micro-batches hold at most --token-capacity tokens (default: the analytic memory model of
the full model on the cluster's hardware, as a real job would plan them).

examples:
  hydraulis measure --model llama-7b --layers 4 --cluster 8xH200 --lengths code_kafka \\
      --tokens-per-step 256K --steps 2 --token-capacity 16384                  # one H200
  hydraulis measure --model tiny --cluster 4xcpu --lengths sft_gpteacher --tokens-per-step 8K \\
      --token-capacity 1024 --steps 1 --threads 1 --clock process             # CPU smoke"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_lengths_arguments(p)
    add_job_arguments(p)
    g = p.add_argument_group("plans")
    g.add_argument("--tokens-per-step", type=positive_int, default=DEFAULT_TOKENS_PER_STEP, metavar="N",
                   help=f"tokens per global batch (default: {DEFAULT_TOKENS_PER_STEP:,})")
    g.add_argument("--steps", type=positive_int, default=2, metavar="N", help="sampled steps to run (default: 2)")
    g.add_argument("--policies", metavar="LIST", help="comma-separated policies (default: balancer and every baseline)")
    g.add_argument("--max-length", type=positive_int, metavar="L", help="longest sequence (default: data, capped)")
    g.add_argument("--token-capacity", type=positive_int, metavar="N",
                   help="tokens per micro-batch (default: memory model of the full model on the cluster's hardware)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled batches (default: 0)")
    g = p.add_argument_group("device")
    g.add_argument("--layers", type=positive_int, metavar="N", help="run an N-layer copy of the model")
    g.add_argument("--budget", type=positive_int, metavar="N",
                   help="tokens per calibration micro-batch (default: the token capacity)")
    g.add_argument("--repeats", type=positive_int, default=3, help="timed runs per calibration micro-batch (default: 3)")
    g.add_argument("--run-repeats", type=positive_int, default=1,
                   help="runs per plan micro-batch, fastest kept (default: 1)")
    g.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall time, or the process's CPU time (CPU only; use with --threads 1)")
    g.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads while timing")
    g.add_argument("--attention", choices=KERNEL_CHOICES, default="auto",
                   help="attention kernel (default: auto, the kernel training runs; see `hydraulis calibrate --help`)")
    p.add_argument("--out", default="hydraulis-measure", metavar="DIR", help="output folder (default: hydraulis-measure)")


def _capacity(args: argparse.Namespace, job: Any) -> int:
    from strategies.layout import Layout

    from ._common import CliError

    if args.token_capacity:
        return int(args.token_capacity)
    try:
        return int(job.cost_model().token_capacity(Layout()))
    except ValueError as e:
        raise CliError(f"the full model does not fit one rank by the memory model ({e}); pass --token-capacity") from None


def run(args: argparse.Namespace) -> int:
    import json
    import time
    import warnings
    from dataclasses import replace

    import numpy as np
    import torch

    from balancer.baselines import BASELINES
    from balancer.calibrate import CalibrationWarning
    from balancer.cost import CostModel
    from balancer.decoder import decoder_step_fn
    from balancer.device import calibration_device, cpu_threads, time_call
    from balancer.measure import execute_plan, summarize, summary_table
    from balancer.simulation import SimulationConfig, load_jsonl_plans, simulate

    from ._common import CliError, describe_cluster, fmt_params, load_job, load_lengths, output_dir
    from .calibrate import report
    from .plan import PlanOptions, generate
    from .simulate import parse_policies

    if getattr(args, "cost_model", None):
        raise CliError("measure calibrates the model it runs; pass --model (and --layers), not --cost-model")
    job = load_job(args)
    if job.model is None or job.cluster is None:
        raise CliError("measure needs --model (e.g. llama-7b) and --cluster (e.g. 8xH200)")
    spec, cluster = job.model, job.cluster
    if args.layers is not None and args.layers > spec.num_layers:
        raise CliError(f"--layers {args.layers} exceeds the {spec.num_layers} layers of {spec.name}")
    policies = parse_policies(args.policies)
    capacity = _capacity(args, job)
    lengths_input = load_lengths(args)
    out = output_dir(args.out)
    cut = replace(spec, num_layers=args.layers) if args.layers else spec
    device = calibration_device()
    dtype = torch.bfloat16 if device.type == "cuda" and spec.dtype_bytes == 2 else torch.float32
    print(f"cluster: {describe_cluster(cluster, job.hardware.name if job.hardware else None)}; "
          f"tokens per step {args.tokens_per_step:,}; micro-batches of at most {capacity:,} tokens")
    print(f"building {cut.name} at depth {cut.num_layers} ({fmt_params(cut.num_parameters)} parameters) "
          f"on {device} in {str(dtype).removeprefix('torch.')}", flush=True)
    with cpu_threads(args.threads):
        step = decoder_step_fn(cut, device, dtype, args.seed, args.attention)

        # 1. the cost model of exactly what runs: calibrated on packed micro-batches of it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)  # printed by report()
            cost = CostModel.calibrate(
                cut, step_fn=step, token_capacity=capacity, token_budget=args.budget or capacity,
                length_pool=lengths_input.lengths, repeats=args.repeats, clock=args.clock, seed=args.seed,
                progress=False, log=lambda line: print(line, flush=True),
            )
        for line in report(cost):
            print(line)
        cost.save(out / "cost_model.json")

        # 2. plans of every policy on the same sampled batches
        lengths = lengths_input.sample(min(max(lengths_input.profile.num_sequences, 1), 1_000_000), seed=args.seed)
        planned = generate(lengths_input, cost, cluster, PlanOptions(
            tokens_per_step=args.tokens_per_step, max_length=args.max_length, seed=args.seed))
        extra = {"policies": policies} if policies else {}
        cfg = SimulationConfig(tokens_per_step=args.tokens_per_step, num_steps=args.steps, max_length=planned.max_length,
                               seed=args.seed, dump_plans=str(out / "plans.jsonl"), **extra)
        print(f"planning {args.steps} steps (max length {planned.max_length:,}) ...", flush=True)
        sim = simulate(lengths, cluster, cost, cfg, candidates=list(planned.pool.strategies))
        capped = np.minimum(lengths, sim.max_length)

        # 3. every replica's micro-batches on this device, one replica after another
        def timer(mb: tuple[int, ...]) -> float:
            return min(time_call(lambda: step(mb), device, args.clock) for _ in range(args.run_repeats))

        measured: list[MeasuredPlan] = []
        skipped: dict[str, str] = {}
        for policy, step_no, plan in load_jsonl_plans(out / "plans.jsonl"):
            if policy in skipped:
                continue
            t0 = time.perf_counter()
            cls = BASELINES.get(policy)
            try:
                m = execute_plan(plan, capped, cost, timer, policy=policy, cluster=cluster,
                                 padded=bool(cls is not None and cls.pads))
            except ValueError as e:
                skipped[policy] = str(e)
                print(f"{policy}: skipped: {e}")
                continue
            measured.append(m)
            r = m.ratios()
            print(f"{policy:>26} step {step_no}: est {m.est_step_seconds:.4g} s, measured {m.measured_step_seconds:.4g} s, "
                  f"imbalance {m.measured_imbalance:.3f}; est/measured per replica {np.median(r):.3f} "
                  f"[{r.min():.3f}–{r.max():.3f}] ({time.perf_counter() - t0:.1f} s)", flush=True)

    summary = summarize(measured)
    ratios = np.concatenate([m.ratios() for m in measured]) if measured else np.zeros(0)
    overall = float(np.median(np.abs(ratios - 1.0))) if ratios.size else float("nan")
    table = summary_table(summary)
    print(f"\nmeasured on {cost.meta['device']} ({cut.name}, depth {cut.num_layers}, attention {step.attention}):")
    print(table)
    print(f"estimate/measured over all {ratios.size} replicas: median |ratio − 1| = {100 * overall:.1f}%")
    data = {
        "device": cost.meta["device"], "torch": cost.meta["torch"], "attention": step.attention,
        "model": spec.to_dict(), "layers_run": cut.num_layers, "cluster": cluster.to_dict(),
        "data": lengths_input.label, "tokens_per_step": args.tokens_per_step, "steps": args.steps,
        "token_capacity": capacity, "max_length": sim.max_length, "calibration": {
            "fit": cost.meta["fit"], "reliable": cost.meta["reliable"], "problems": cost.meta["problems"]},
        "summary": summary, "median_abs_error": overall, "skipped": skipped,
        "plans": [m.to_dict() for m in measured],
    }
    (out / "measured.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "measured.md").write_text(
        f"Measured on {cost.meta['device']} (torch {cost.meta['torch']}, attention {step.attention}): {cut.name} at "
        f"depth {cut.num_layers}, {lengths_input.label}, {describe_cluster(cluster, None)}, "
        f"{args.tokens_per_step:,} tokens per step, {args.steps} step{'s' if args.steps != 1 else ''}, "
        f"micro-batches ≤ {capacity:,} tokens.\n\n"
        + table + f"\nMedian |estimate/measured − 1| over all {ratios.size} replicas: {100 * overall:.1f}%.\n"
    )
    print(f"wrote {out / 'measured.json'}, {out / 'measured.md'}, {out / 'plans.jsonl'}, {out / 'cost_model.json'}")
    return 0
