"""``hydraulis calibrate``: time the model on this device and fit the cost model."""

from __future__ import annotations

import argparse

from ._common import positive_int

HELP = "measure the cost model on this device (cost-model JSON)"
DESCRIPTION = """\
Time forward + backward of a Llama-style decoder of --model's shape on this device (CUDA
if available, else the CPU) at several sequence lengths, fit t(s) = a·s² + b·s + c by
non-negative least squares (CostModel.calibrate) and write the cost model as JSON. `plan`,
`simulate` and `profile` accept it with --cost-model FILE instead of --model.

The token capacity per micro-batch comes from the analytic memory model of the model on
--hardware (default: this device with its real memory), or --token-capacity.

examples:
  hydraulis calibrate --model tiny --out cost_model.json
  hydraulis calibrate --model llama-7b --lengths 1024,2048,4096,8192 --repeats 3   # on a GPU
  hydraulis calibrate --model tiny --threads 1 --clock process                      # shared CPU"""


def _lengths(text: str) -> list[int]:
    vals = [positive_int(t) for t in text.split(",") if t.strip()]
    if len(vals) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two lengths, e.g. 256,512,1024")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", metavar="M", help="model preset or file to time (default: tiny)")
    p.add_argument("--layout", default="tp1", help="layout name the coefficients are stored under (default: tp1)")
    p.add_argument("--lengths", type=_lengths, metavar="L1,L2,...",
                   help="sequence lengths to time (default: 256..2048 on CPU, 1K..16K on GPU)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per length (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per length first (default: 1)")
    p.add_argument("--statistic", choices=("min", "median"), default="min",
                   help="how the runs of one length reduce (default: min)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall time, or the process's CPU time (CPU only; use with --threads 1)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads while timing")
    p.add_argument("--token-capacity", type=positive_int, metavar="N", help="tokens per micro-batch (default: memory model)")
    p.add_argument("--hardware", metavar="H", help="hardware preset or file for the memory model (default: this device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="cost_model.json", metavar="FILE", help="output JSON (default: cost_model.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from balancer.cost import CostModel
    from hydraulis.config import resolve_hardware, resolve_model
    from strategies.layout import Layout

    from ._common import fmt_params, format_table

    spec = resolve_model(args.model)
    layout = Layout.parse(args.layout)
    hardware = resolve_hardware(args.hardware) if args.hardware else None
    print(f"calibrating {spec.name} ({fmt_params(spec.num_parameters)} parameters), layout {layout.name} ...", flush=True)
    cost = CostModel.calibrate(
        spec, lengths=args.lengths, layout=layout, token_capacity=args.token_capacity, hardware=hardware,
        warmup=args.warmup, repeats=args.repeats, statistic=args.statistic, clock=args.clock,
        num_threads=args.threads, seed=args.seed, progress=False if args.quiet else None,
    )
    c = cost.cost(layout)
    lengths = np.asarray(cost.meta["lengths"], dtype=np.int64)
    measured = np.asarray(cost.meta["seconds"], dtype=np.float64)
    fitted = c.seconds(lengths) + c.c
    rows = [[f"{s:,}", f"{m * 1e3:.2f}", f"{f * 1e3:.2f}", f"{100 * (f - m) / m:+.1f}%"]
            for s, m, f in zip(lengths, measured, fitted)]
    print(f"device: {cost.meta.get('device')} ({cost.meta.get('device_type')}, torch {cost.meta.get('torch')}, "
          f"{cost.meta.get('num_threads')} threads, clock {args.clock})")
    print(format_table(["length", "measured ms", "fit ms", "error"], rows))
    print(f"fit: t(s) = {c.a:.4g}·s² + {c.b:.4g}·s seconds, c = {c.c:.4g} s per micro-batch, "
          f"R² = {cost.fit_r2(layout):.4f}; token capacity {c.token_capacity:,}")
    if c.a > 0 and c.b > 0:
        print(f"attention (the s² term) equals the linear work at s = {c.b / c.a:,.0f} tokens")
    cost.save(args.out)
    print(f"wrote {args.out} (use it with --cost-model {args.out})")
    return 0
