"""``hydraulis calibrate``: time packed micro-batches of the model on this device and fit the cost model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from strategies.kernels import KERNEL_CHOICES

from ._common import positive_int

if TYPE_CHECKING:  # pragma: no cover - typing only
    from balancer.cost import CostModel

HELP = "measure the cost model on this device (cost-model JSON)"
DESCRIPTION = """\
Build a Llama-style decoder of --model's shape on this device (CUDA if available, else
the CPU) in its compute dtype, time forward + backward of packed micro-batches of several
compositions — one long sequence, many short ones, mixed, and (with --lengths) drawn from
a length file — and fit t(m) = Σ (a·s² + b·s + d) + c by non-negative least squares
(CostModel.calibrate). Prints every micro-batch's measured and fitted time and writes the
cost model as JSON; `plan`, `simulate`, `profile` and `measure` accept it with
--cost-model FILE instead of --model.

--layers N times an N-layer copy of the model (and its embedding, head and loss alone) and
scales to the full depth: a 7B shape calibrates from ~1 B parameters on the device. A fit
with R² below 0.98 or launch-bound timings is reported as unreliable (a warning line;
exit status 3 with --strict, the JSON is written either way).

The token capacity per micro-batch comes from the analytic memory model of the model on
--hardware (default: this device with its real memory; on a CPU without --hardware, the
largest calibrated micro-batch instead of what the RAM would allow), or --token-capacity.

examples:
  hydraulis calibrate --model tiny --out cost_model.json
  hydraulis calibrate --model llama-7b --layers 4 --lengths code_kafka --repeats 3   # on a GPU
  hydraulis calibrate --model tiny --threads 1 --clock process --strict              # shared CPU"""

UNRELIABLE_EXIT = 3
"""Exit status of ``--strict`` when the fit is unreliable."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", metavar="M", help="model preset or file to time (default: tiny)")
    p.add_argument("--layout", default="tp1", help="layout name the coefficients are stored under (default: tp1)")
    p.add_argument("--lengths", metavar="L",
                   help="length file (Parquet with a 'length' column) or bundled name to draw mixed micro-batches from")
    p.add_argument("--budget", type=positive_int, metavar="N",
                   help="tokens per calibration micro-batch (default: 2048 on CPU, 16384 on GPU, at most the capacity)")
    p.add_argument("--layers", type=positive_int, metavar="N",
                   help="time an N-layer copy of the model and scale per layer to its full depth")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per micro-batch (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per micro-batch first (default: 1)")
    p.add_argument("--statistic", choices=("min", "median"), default="min",
                   help="how the runs of one micro-batch reduce (default: min)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall time, or the process's CPU time (CPU only; use with --threads 1)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads while timing")
    p.add_argument("--attention", choices=KERNEL_CHOICES, default="auto",
                   help="attention kernel (default: auto, the kernel training runs: flash_attn or varlen on CUDA "
                        "in bf16/fp16 when it passes its self-check, else SDPA per sequence)")
    p.add_argument("--token-capacity", type=positive_int, metavar="N", help="tokens per micro-batch (default: memory model)")
    p.add_argument("--hardware", metavar="H", help="hardware preset or file for the memory model (default: this device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help=f"exit with status {UNRELIABLE_EXIT} when the fit is unreliable")
    p.add_argument("--out", default="cost_model.json", metavar="FILE", help="output JSON (default: cost_model.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def report(cost: "CostModel") -> list[str]:
    """Lines describing a calibrated model: every micro-batch measured vs fitted, the fit, the verdict."""
    import numpy as np

    from strategies.layout import Layout

    from ._common import format_table

    meta = cost.meta
    lay = Layout.parse(next(iter(meta["fit"])))
    c = cost.cost(lay)
    timed = meta["timed_fit"]
    depth = meta.get("depth")
    measured = np.asarray(meta["seconds"])
    headers = ["micro-batch", "seqs", "tokens", "measured ms", "fit ms", "error"]
    cols = [measured, np.asarray(timed["predicted"])]
    if depth:
        headers[3] = f"measured ms ({_layers(depth['timed_layers'])})"
        headers += ["no layers ms", f"scaled to {_layers(depth['model_layers'])} ms", "fit ms", "error"]
        cols += [np.asarray(depth["seconds_no_layers"]), np.asarray(depth["scaled_seconds"]),
                 np.asarray(meta["fit"][lay.name]["predicted"])]
    rows = []
    for k, (label, mb) in enumerate(zip(meta["labels"], meta["micro_batches"])):
        row = [label, len(mb), f"{sum(mb):,}", f"{cols[0][k] * 1e3:.2f}", f"{cols[1][k] * 1e3:.2f}",
               f"{100 * (cols[1][k] - cols[0][k]) / cols[0][k]:+.1f}%"]
        if depth:
            row += [f"{cols[2][k] * 1e3:.2f}", f"{cols[3][k] * 1e3:.2f}", f"{cols[4][k] * 1e3:.2f}",
                    f"{100 * (cols[4][k] - cols[3][k]) / cols[3][k]:+.1f}%"]
        rows.append(row)
    lines = [
        f"device: {meta.get('device')} ({meta.get('device_type')}, torch {meta.get('torch')}, "
        f"{meta.get('num_threads')} threads, clock {meta.get('clock')}, attention {meta.get('attention')})",
        format_table(headers, rows),
    ]

    def coefficients(f: dict, what: str) -> str:
        return (f"{what}: t(m) = Σ ({f['a']:.4g}·s² + {f['b']:.4g}·s + {f['d']:.4g}) + {f['c']:.4g} s "
                f"(a·s² + b·s + d per sequence, c per micro-batch), R² = {f['r2']:.4f}")

    if depth:
        lines.append(coefficients(timed, f"fit at {_layers(depth['timed_layers'])}"))
        lines.append(coefficients(meta["fit"][lay.name], f"scaled to {_layers(depth['model_layers'])} (stored)"))
    else:
        lines.append(coefficients(timed, "fit"))
    source = f"; {meta['token_capacity_from']}" if meta.get("token_capacity_from") else ""
    lines.append(f"token capacity {c.token_capacity:,} per micro-batch (layout {lay.name}{source})")
    if c.a > 0 and c.b > 0:
        lines.append(f"attention (the s² term) equals the linear work at s = {c.b / c.a:,.0f} tokens")
    if c.d > 0 and c.b > 0:
        lines.append(f"one sequence's overhead d equals the linear work of {c.d / c.b:,.0f} tokens")
    for problem in meta.get("problems", []):
        lines.append(f"warning: calibration unreliable: {problem}")
    return lines


def run(args: argparse.Namespace) -> int:
    import warnings

    from balancer.calibrate import CalibrationWarning
    from balancer.cost import CostModel
    from hydraulis.config import resolve_hardware, resolve_model
    from strategies.layout import Layout

    from ._common import fmt_params, read_length_file

    spec = resolve_model(args.model)
    layout = Layout.parse(args.layout)
    hardware = resolve_hardware(args.hardware) if args.hardware else None
    pool = read_length_file(args.lengths) if args.lengths else None
    if args.layers is not None and args.layers > spec.num_layers:
        raise ValueError(f"--layers {args.layers} exceeds the {spec.num_layers} layers of {spec.name}")
    print(f"calibrating {spec.name} ({fmt_params(spec.num_parameters)} parameters), layout {layout.name} ...", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # printed below as one line each
        cost = CostModel.calibrate(
            spec, token_budget=args.budget, length_pool=pool, layout=layout, num_layers=args.layers,
            token_capacity=args.token_capacity, hardware=hardware, warmup=args.warmup, repeats=args.repeats,
            statistic=args.statistic, clock=args.clock, num_threads=args.threads, seed=args.seed,
            attention=args.attention, progress=False if args.quiet else None,
            log=lambda line: print(line, flush=True),
        )
    for line in report(cost):
        print(line)
    cost.save(args.out)
    print(f"wrote {args.out} (use it with --cost-model {args.out})")
    if args.strict and not cost.meta["reliable"]:
        return UNRELIABLE_EXIT
    return 0
