"""Runtime benchmark: Engine steps per attention kernel, tokens/s, MFU, estimate vs measured, memory.

    python benchmarks/runtime.py --lengths PATH_OR_BUNDLED_NAME [--device auto|cpu|cuda]
                                 [--parts attention,mfu] [--steps N] [--smoke] [--budget-s S]

One rank (a one-process ``torch.distributed`` group: gloo on the CPU, NCCL on CUDA) runs
:class:`strategies.runtime.Engine` on real sequence lengths (``--lengths``, capped at the
model's maximum length) with synthetic token ids; each step's global batch is drawn from
the lengths up to a token budget and planned by a :class:`balancer.selector.Balancer`
whose cost model is **calibrated here**: forward + backward of the same model (weights in
the compute dtype, the same attention kernel) is timed on packed micro-batches of the
compositions ``hydraulis calibrate`` times (:func:`balancer.calibrate.calibration_micro_batches`:
one long sequence, the budget cut into many short ones, long next to short, and micro-batches
drawn from the length file; none with a sequence over the model's maximum length) and fitted
to ``t(m) = Σ (a·s² + b·s + d) + c`` (:meth:`balancer.cost.CostModel.fit`, ``d`` per
sequence, ``c`` per micro-batch). The plan's ``est_step_seconds`` is that calibrated
estimate of forward + backward; *compute* is the engine's forward + backward seconds
(``rank_seconds``) and *step* the whole ``Engine.step``, which also gathers the compute
weights, reduce-scatters the gradients and runs AdamW on the sharded state.

Parts:

* ``attention`` — the same model and batches through every attention kernel available on
  the device (:func:`strategies.runtime.available_kernels`), plus on CUDA the former
  default: per-segment SDPA with torch free to choose its backend (cuDNN on H100/H200),
  labelled ``sdpa_any``. Each kernel is first checked against the dense reference on the
  device (max error of outputs and gradients, :func:`~strategies.runtime.kernel_support`).
* ``mfu`` — a larger model (on CUDA ≥ 1B parameters) with the automatic kernel: model
  FLOPs utilisation against the **measured** peak of a large matmul in the compute dtype
  (model FLOPs = 3 × forward FLOPs of :func:`balancer.analytic.forward_flops`, causal
  attention counted once), tokens/s, estimate vs measured, and the bytes the engine holds
  and the peak device memory against balancer's memory model of the runtime's layout
  (``AnalyticOptions(zero_stage="world")``: sharded state + compute shard + activations).

Targets on a GPU: measured step ≤ 1.3 × estimate; MFU ≥ 40 % of the measured matmul peak
for the ≥ 1B model. Results: ``benchmarks/results/runtime_<tag>.json`` and ``.md`` (tag: the
device type, or ``--tag``), written after every part so a failure keeps the others.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
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

from balancer.analytic import forward_flops  # noqa: E402
from balancer.calibrate import measure  # noqa: E402
from balancer.cost import CostModel  # noqa: E402
from balancer.data import read_lengths  # noqa: E402
from balancer.selector import Balancer, BalancerConfig  # noqa: E402
from balancer.specs import ModelSpec  # noqa: E402
from benchmarks.runtime_common import calibration_set, fit_summary, global_batches, pack  # noqa: E402
from strategies import ClusterSpec, Layout, Strategy  # noqa: E402
from strategies.runtime import (  # noqa: E402
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    available_kernels,
    build_segments,
    causal_attention,
    check_micro_batch,
    choose_kernel,
    free_port,
    kernel_support,
    prepare_micro_batch,
    reference_attention,
)

RESULTS = ROOT / "benchmarks" / "results"

# name → (model, max length, tokens per step, tokens per micro-batch). The CUDA attention
# model is the (examples/train_gpt_balanced.py --hidden 1024 --layers 4 ...).
SETTINGS: dict[str, dict[str, Any]] = {
    "cuda": {
        "attention": (dict(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=4,
                           ffn_hidden_size=2816), 16384, 65536, 16384),
        "mfu": (dict(vocab_size=32000, hidden_size=4096, num_layers=8, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=11008), 16384, 65536, 16384),
        "steps": 5, "warmup": 2, "peak_n": 8192,
    },
    "cpu": {
        "attention": (dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           ffn_hidden_size=256), 512, 4096, 1024),
        "mfu": (dict(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=512), 512, 4096, 1024),
        "steps": 4, "warmup": 1, "peak_n": 1024,
    },
}
CLOCK = {"cuda": ("wall", time.perf_counter), "cpu": ("process", time.process_time)}
"""Clock of the calibration and of the engine per device: on the (shared) CPU the process's
own CPU time with one torch thread, which other processes cannot inflate."""
SMOKE = {"attention": (dict(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                            ffn_hidden_size=128), 128, 512, 256),
         "steps": 1, "warmup": 1, "peak_n": 256}
SMOKE["mfu"] = SMOKE["attention"]


# -- set-up ---------------------------------------------------------------------------------------
def init_single_rank(device: torch.device) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    cpus=os.cpu_count(), load=[round(x, 2) for x in os.getloadavg()])
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    """Measured FLOP/s of an ``n × n × n`` matmul in ``dtype`` (best of ``repeats``, the device's clock)."""
    clock = CLOCK[device.type][1]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n**3 / best


def model_spec(cfg: ModelConfig, dtype_bytes: int = 2) -> ModelSpec:
    return ModelSpec(name="bench", num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                     num_kv_heads=cfg.num_kv_heads, ffn_hidden_size=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size,
                     dtype_bytes=dtype_bytes)


def model_flops(cfg: ModelConfig, lengths: np.ndarray) -> float:
    """Training FLOPs of sequences ``lengths``: 3 × forward (no recompute), causal attention once."""
    fwd = forward_flops(model_spec(cfg))
    return float(sum(3 * fwd.total(float(s), cfg.num_layers) for s in lengths))


# -- measurements ---------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_chooses_sdpa_backend():
    """The former path: per-segment SDPA with the backend left to torch (cuDNN on H100/H200)."""
    import torch._dynamo  # noqa: F401 — imported lazily by SDPA later, it reads sdpa_kernel.__wrapped__
    import torch.nn.attention as tna

    real = tna.sdpa_kernel

    @functools.wraps(real)
    def any_backend(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    tna.sdpa_kernel = any_backend
    try:
        yield
    finally:
        tna.sdpa_kernel = real


def kernel_error(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, Any]:
    """Max |kernel − dense reference| of outputs and gradients on a packed row, no cp and cp = 2."""
    out: dict[str, Any] = {}
    if kernel != "sdpa_any":
        s = kernel_support(kernel, device, dtype)
        out.update(square=s.square, cp=s.rect, gqa=s.gqa, detail=s.detail)
    g = torch.Generator().manual_seed(0)
    seq_lens = np.array([300, 1000, 17, 700])
    worst = 0.0
    for cp, r in ((1, 0), (2, 1)):
        seg = build_segments(seq_lens, cp, r, device)
        base = [torch.randn(n, h, head_dim, generator=g) for n, h in ((seg.num_queries, 4), (int(seq_lens.sum()), 2),
                                                                        (int(seq_lens.sum()), 2))]
        res = []
        for fn in (lambda a, b, c: causal_attention(a, b, c, seg, "sdpa" if kernel == "sdpa_any" else kernel),
                   lambda a, b, c: reference_attention(a, b, c, seg)):
            leaves = [x.to(device, dtype).requires_grad_() for x in base]
            o = fn(*leaves)
            (o.float() * torch.linspace(-1, 1, o.numel(), device=device).view_as(o)).sum().backward()
            res.append([o.detach().float(), *(x.grad.float() for x in leaves)])
        worst = max(worst, *(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(*res)))
    out["max_rel_error"] = worst
    return out


def calibrate(cfg: ModelConfig, kernel: str, device: torch.device, dtype: torch.dtype,
              micro_batches: list[tuple[int, ...]], capacity: int) -> CostModel:
    """``tp1`` cost model of this model and kernel, timed here on packed ``micro_batches``:
    ``Σ (a·s² + b·s + d) + c`` by non-negative least squares (R² in ``meta["fit"]``)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).to(dtype)
    model.attention_kernel = kernel

    def step(micro_batch: tuple[int, ...]) -> None:
        lens = list(micro_batch)
        mb = pack(lens, cfg.vocab_size, np.random.default_rng(sum(lens)), sum(lens) - len(lens))
        batch = prepare_micro_batch(check_micro_batch(mb, 0, cfg.vocab_size), SINGLE_DEVICE, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    run = measure(step, micro_batches, device=device, warmup=1, repeats=2, progress=False,
                  clock=CLOCK[device.type][0])
    return CostModel.fit(run.micro_batches, run.seconds, token_capacity=capacity, layout=Layout(1))


def engine_run(cfg: ModelConfig, kernel: str, device: torch.device, dtype: torch.dtype, cost: CostModel,
               batches: list[np.ndarray], warmup: int) -> dict[str, Any]:
    """Engine steps on ``batches`` (the first ``warmup`` untimed); per-step numbers and their medians."""
    strategy = Strategy.homogeneous(Layout(1), 1)
    balancer = Balancer(ClusterSpec(num_ranks=1, ranks_per_node=1), [strategy], cost, BalancerConfig(seed=0))
    engine = Engine([strategy], cfg, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1),
                    config=EngineConfig(autocast_dtype=None if dtype == torch.float32 else dtype,
                                        attention="sdpa" if kernel == "sdpa_any" else kernel,
                                        token_capacity=cost.token_capacity, clock=CLOCK[device.type][1]),
                    device=device)
    rng = np.random.default_rng(1)
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k, lens in enumerate(batches):
        plan = balancer.plan(lens, step=k)
        glt = int((lens - 1).sum())
        mbs = [pack([int(lens[i]) for i in mb], cfg.vocab_size, rng, glt) for mb in plan.for_rank(0).micro_batches]
        result = engine.step(plan, mbs)
        rows.append({"step": k, "warmup": k < warmup, "tokens": int(lens.sum()), "sequences": int(lens.size),
                     "micro_batches": len(mbs), "estimate_s": plan.est_step_seconds,
                     "compute_s": result.rank_seconds[0], "step_s": result.step_seconds,
                     "gather_s": result.gather_seconds, "sync_s": result.sync_seconds,
                     "optimizer_s": result.optimizer_seconds, "flops": model_flops(cfg, lens),
                     "loss": result.loss})
    timed = [r for r in rows if not r["warmup"]] or rows
    med = {key: float(np.median([r[key] for r in timed])) for key in ("estimate_s", "compute_s", "step_s")}
    tokens = sum(r["tokens"] for r in timed)
    out = {
        "kernel": kernel, "engine_kernel": engine.attention_kernel, "steps": rows,
        "median": med,
        "compute_over_estimate": float(np.median([r["compute_s"] / r["estimate_s"] for r in timed])),
        "step_over_estimate": float(np.median([r["step_s"] / r["estimate_s"] for r in timed])),
        "tokens_per_s": tokens / sum(r["step_s"] for r in timed),
        "flops_per_s_step": sum(r["flops"] for r in timed) / sum(r["step_s"] for r in timed),
        "flops_per_s_compute": sum(r["flops"] for r in timed) / sum(r["compute_s"] for r in timed),
        "resident_bytes": dict(result.resident_bytes),
        "parameters": engine.num_parameters,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def memory_model(cfg: ModelConfig, micro_tokens: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """balancer's memory model of the run (world 1, tp 1): the runtime's layout (``zero_stage="world"``,
    the vocabulary split over tp — whole at tp 1) plus the activations of one full micro-batch."""
    from balancer.analytic import AnalyticModel
    from balancer.analytic_options import AnalyticOptions
    from balancer.calibrate import local_hardware

    width = torch.finfo(dtype).bits // 8
    options = AnalyticOptions(zero_stage="world", num_ranks=1)
    an = AnalyticModel(model_spec(cfg, width), local_hardware(device), options).analyze(Layout(1))
    activations = an.activation_bytes_per_token * micro_tokens
    return {"static": an.static_bytes, "activations": activations, "total": an.static_bytes + activations}


# -- the parts ------------------------------------------------------------------------------------
class Budget:
    """Seconds left of ``--budget-s`` (None: unlimited); optional work is skipped when short."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def part_attention(env: dict[str, Any], device: torch.device, dtype: torch.dtype, lengths_all: np.ndarray,
                   budget: Budget, log, out: dict[str, Any], save) -> None:
    model, max_len, per_step, micro = env["attention"]
    cfg = ModelConfig(**model)
    lengths = np.minimum(lengths_all, max_len)
    batches = global_batches(lengths, per_step, env["warmup"] + env["steps"], seed=0)
    kernels = available_kernels(device, dtype) + (["sdpa_any"] if device.type == "cuda" else [])
    rows: list[dict[str, Any]] = []
    calibration = calibration_set(lengths_all, max_len, micro)
    out.update(model=model, max_length=max_len, tokens_per_step=per_step, micro_batch_tokens=micro, rows=rows,
               calibration_micro_batches=[list(mb) for mb in calibration])
    for kernel in kernels:
        if kernel == "sdpa_any" and budget.left() < 25:  # ~12 s on an H200: two steps of 3–6 s
            rows.append({"kernel": kernel, "skipped": f"time budget ({budget.left():.0f} s left)"})
            continue
        log(f"attention: {kernel}")
        t0 = time.perf_counter()
        row: dict[str, Any] = {"kernel": kernel}
        try:
            with torch_chooses_sdpa_backend() if kernel == "sdpa_any" else contextlib.nullcontext():
                row["check"] = kernel_error(kernel, device, dtype, cfg.head_dim)
                cost = calibrate(cfg, "sdpa" if kernel == "sdpa_any" else kernel, device, dtype, calibration, micro)
                row["fit"] = fit_summary(cost)
                # the former path costs seconds per step: two steps, one of them warm-up
                few = batches[:2] if kernel == "sdpa_any" else batches
                row.update(engine_run(cfg, kernel, device, dtype, cost, few, 1 if kernel == "sdpa_any"
                                      else env["warmup"]))
        except Exception:  # noqa: BLE001 — keep the other kernels' results
            row["error"] = traceback.format_exc(limit=3)
            log(row["error"])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        save()


def part_mfu(env: dict[str, Any], device: torch.device, dtype: torch.dtype, lengths_all: np.ndarray,
             budget: Budget, log, out: dict[str, Any], save) -> None:
    model, max_len, per_step, micro = env["mfu"]
    cfg = ModelConfig(**model)
    lengths = np.minimum(lengths_all, max_len)
    log("mfu: matmul peak")
    peak = matmul_peak(device, dtype, env["peak_n"])
    kernel = choose_kernel("auto", device, dtype)
    calibration = calibration_set(lengths_all, max_len, micro)
    log(f"mfu: calibrating ({kernel}, {len(calibration)} packed micro-batches)")
    cost = calibrate(cfg, kernel, device, dtype, calibration, micro)
    batches = global_batches(lengths, per_step, env["warmup"] + env["steps"], seed=1)
    log(f"mfu: {len(batches)} engine steps")
    run = engine_run(cfg, kernel, device, dtype, cost, batches, env["warmup"])
    run["mfu_step"] = run["flops_per_s_step"] / peak
    run["mfu_compute"] = run["flops_per_s_compute"] / peak
    run["memory_model"] = memory_model(cfg, micro, dtype, device)
    out.update(model=model, max_length=max_len, tokens_per_step=per_step, micro_batch_tokens=micro,
               peak_flops=peak, cost_model=fit_summary(cost), calibration_micro_batches=[list(mb) for mb in calibration],
               run=run)


# -- report ---------------------------------------------------------------------------------------
def fmt_s(x: float) -> str:
    return f"{x:.4f}" if x < 10 else f"{x:.1f}"


def fmt_r2(fit: dict[str, float] | None) -> str:
    return "—" if not fit or "r2" not in fit else f"{fit['r2']:.4f}"


def fmt_b(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def markdown(res: dict[str, Any]) -> str:
    info = res["device"]
    clock = "wall time" if info["device_type"] == "cuda" else "process CPU time, one torch thread"
    lines = [f"Runtime benchmark on **{info.get('device')}** ({info['device_type']}, torch {info['torch']}"
             + (f", CUDA {info['cuda']}" if info.get("cuda") else "") + f"), {res['date']}; times are {clock}"
             + (f", load {info['load']}" if "load" in info else "") + ". "
             f"Command: `{res['command']}`. Lengths: {res['lengths']}. Compute dtype {res['dtype']}. "
             "Estimates are calibrated here: forward + backward of the same model and kernel on packed "
             "micro-batches (one long sequence, many short, long next to short, drawn from the length file; "
             "the compositions of `hydraulis calibrate`), fitted to Σ (a·s² + b·s + d) + c; *compute* is the "
             "engine's forward + backward, *step* the whole Engine.step (gather compute weights, compute, "
             "reduce-scatter, AdamW). Medians over the timed steps.", ""]
    att = res.get("attention")
    if att and "model" in att:
        m = att["model"]
        lines += [f"**Attention kernels** — hidden {m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} "
                  f"heads / {m['num_kv_heads']} KV, ffn {m['ffn_hidden_size']}, vocab {m['vocab_size']}; "
                  f"≤ {att['max_length']:,} tokens per sequence, {att['tokens_per_step']:,} tokens per step, "
                  f"{att['micro_batch_tokens']:,} per micro-batch.", "",
                  "| kernel | check vs dense reference (max rel. error; cases) | fit R² | estimate s | compute s "
                  "| step s | compute / estimate | step / estimate | tokens/s (step) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in att["rows"]:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r['kernel']} | {r.get('skipped') or 'error: ' + r['error'].splitlines()[-1]} "
                             "| | | | | | | |")
                continue
            c = r["check"]
            cases = "" if "square" not in c else (
                f"; square {'ok' if c['square'] else 'no'}, cp {'ok' if c['cp'] else 'sdpa'}, "
                f"gqa {'native' if c['gqa'] else 'expanded'}")
            md = r["median"]
            lines.append(f"| {r['kernel']} | {c['max_rel_error']:.1e}{cases} | {fmt_r2(r.get('fit'))} | "
                         f"{fmt_s(md['estimate_s'])} | {fmt_s(md['compute_s'])} | {fmt_s(md['step_s'])} | "
                         f"{r['compute_over_estimate']:.2f} | {r['step_over_estimate']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} |")
        lines.append("")
        if any(r["kernel"] == "sdpa_any" for r in att["rows"]):
            lines += ["`sdpa_any` is the former default (per-segment SDPA, backend left to torch); the runtime "
                      "never runs it.", ""]
    mfu = res.get("mfu")
    if mfu and "run" in mfu:
        m, r = mfu["model"], mfu["run"]
        mm = r["memory_model"]
        lines += [f"**MFU** — {r['parameters'] / 1e9:.2f} B parameters" if r["parameters"] >= 1e8 else
                  f"**MFU** — {r['parameters'] / 1e6:.2f} M parameters"]
        lines[-1] += (f" (hidden {m['hidden_size']}, "
                  f"{m['num_layers']} layers, {m['num_heads']} heads / {m['num_kv_heads']} KV, ffn "
                  f"{m['ffn_hidden_size']}, vocab {m['vocab_size']}), kernel {r['engine_kernel']}, "
                  f"{mfu['tokens_per_step']:,} tokens per step, {mfu['micro_batch_tokens']:,} per micro-batch. "
                  f"Measured matmul peak: {mfu['peak_flops'] / 1e12:,.1f} TFLOP/s. Calibrated on "
                  f"{len(mfu.get('calibration_micro_batches', []))} packed micro-batches: "
                  + ", ".join(f"{k}={v:.3g}" for k, v in mfu["cost_model"].items() if k != "r2")
                  + f" (R² {fmt_r2(mfu['cost_model'])}).")
        lines += ["",
                  "| MFU (step) | MFU (compute) | tokens/s | estimate s | compute s | step s | compute / estimate "
                  "| step / estimate |", "|---|---|---|---|---|---|---|---|",
                  f"| **{r['mfu_step']:.1%}** | {r['mfu_compute']:.1%} | {r['tokens_per_s']:,.0f} | "
                  f"{fmt_s(r['median']['estimate_s'])} | {fmt_s(r['median']['compute_s'])} | "
                  f"{fmt_s(r['median']['step_s'])} | {r['compute_over_estimate']:.2f} | "
                  f"{r['step_over_estimate']:.2f} |", ""]
        held = r["resident_bytes"]
        lines += [f"Memory: held by the engine {fmt_b(sum(held.values()))} "
                  f"({', '.join(f'{k} {fmt_b(v)}' for k, v in held.items())}); memory model "
                  "(balancer.analytic, zero_stage='world'): sharded state + compute shard "
                  f"{fmt_b(mm['static'])} (held / model {sum(held.values()) / mm['static']:.3f}) + activations of "
                  f"one micro-batch {fmt_b(mm['activations'])} = {fmt_b(mm['total'])}"
                  + (f"; measured peak {fmt_b(r['peak_memory_bytes'])} (peak / model "
                     f"{r['peak_memory_bytes'] / mm['total']:.2f})" if "peak_memory_bytes" in r else "")
                  + ".", ""]
    for name, err in res.get("errors", {}).items():
        lines += [f"**{name} failed**: `{err.strip().splitlines()[-1]}`", ""]
    lines.append("Targets on a GPU: measured step ≤ 1.3 × the calibrated estimate; MFU ≥ 40 % of the measured matmul "
                 "peak (≥ 1B model).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="code_kafka", help="bundled length file name or a Parquet path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parts", default="attention,mfu")
    p.add_argument("--steps", type=int, default=None, help="timed engine steps per run (default: per device)")
    p.add_argument("--smoke", action="store_true", help="tiny models and one step: check the script runs")
    p.add_argument("--budget-s", type=float, default=None, help="skip optional work when this many seconds passed")
    p.add_argument("--tag", default=None, help="results name: runtime_<tag>.json/md (default: the device type)")
    p.add_argument("--append", action="store_true", help="keep the other parts already in runtime_<tag>.json")
    p.add_argument("--out-dir", default=None,
                   help=f"where to write (default {RESULTS.relative_to(ROOT)}; with --smoke a temporary folder)")
    args = p.parse_args()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    env = dict(SMOKE if args.smoke else SETTINGS[device.type])
    if args.steps is not None:
        env["steps"] = args.steps
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # with the process clock: the work itself, whatever the machine's load
    init_single_rank(device)
    lengths = read_lengths(args.lengths)
    res: dict[str, Any] = {
        "device": device_info(device), "dtype": str(dtype).replace("torch.", ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "lengths": args.lengths,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "errors": {},
    }
    tag = args.tag or (device.type + ("_smoke" if args.smoke else ""))
    out = Path(args.out_dir or (Path(tempfile.gettempdir()) / "hydraulis-runtime-smoke" if args.smoke else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"runtime_{tag}.json"
    if args.append and path.is_file():
        old = json.loads(path.read_text())
        res = {**{k: v for k, v in old.items() if k in ("attention", "mfu")}, **res,
               "command": f"{old.get('command')}; {res['command']}", "errors": old.get("errors", {})}

    def save() -> None:
        path.write_text(json.dumps(res, indent=1, default=float) + "\n")
        path.with_suffix(".md").write_text(markdown(res))

    budget = Budget(args.budget_s)
    log(f"{res['device']}")
    for part in [x.strip() for x in args.parts.split(",") if x.strip()]:
        fn = {"attention": part_attention, "mfu": part_mfu}.get(part)
        if fn is None:
            raise SystemExit(f"unknown part {part!r}; choose from attention, mfu")
        res[part] = {}
        res["errors"].pop(part, None)
        try:
            fn(env, device, dtype, lengths, budget, log, res[part], save)
        except Exception:  # noqa: BLE001 — keep the other part's results
            res["errors"][part] = traceback.format_exc()
            log(res["errors"][part])
        save()
        log(f"{part} done; wrote {path.with_suffix('.md')}")
    print(markdown(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
