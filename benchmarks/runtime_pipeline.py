"""Pipeline benchmark: a pp2 replica's measured time against the planner's 1F1B estimate, on CPU.

    python benchmarks/runtime_pipeline.py --lengths PATH_OR_BUNDLED_NAME [--steps N] [--smoke]

Two gloo processes (one torch thread each) run :class:`strategies.runtime.Engine` with two
candidates on the same ranks: ``tp1pp2x1`` (one pipeline, stage 0 on rank 0, stage 1 on
rank 1) and ``tp1x2`` (two data-parallel replicas, the control). Every global batch —
real lengths (``--lengths``, capped at the model's maximum length) up to a token budget,
synthetic token ids — is planned by a :class:`balancer.selector.Balancer` for each
strategy and run under both, alternating which goes first, so both see the same machine
load.

The cost model is **calibrated here, per stage**, with both ranks timing at once (the
contention of training): every rank times forward + backward of the whole model and of
each stage of the pp2 split (:func:`strategies.runtime.stage_forward`) on one sequence
per length; the ranks' mean of each is fitted to ``a·s² + b·s + c``. The
planner's model of a pipeline layout is one stage's time per micro-batch with equal
stages, so ``tp1pp2`` gets the **busiest stage's** fit (per length, the slower stage).
The plan's per-replica estimate is then the planner's formula

    Σ_k T(m_k) + v·c + (pp − 1)·max_k T(m_k)

and *measured* is the replica's forward + backward wall time (``rank_seconds``, the
slower of its two ranks) — wall time, not process time, because the bubble is time a
stage spends waiting. Reported, as medians over the timed steps:

* ``measured / planner`` for pp2 and for the tp1×2 control; their quotient, per step (the
  two runs of a batch are adjacent in time, so they see the same load), isolates the
  pipeline model's error from the cost model's (both use fits from the same timings);
* ``measured / naive``: the planner's formula with the tp1 fit divided by ``pp`` — an
  even split that ignores the LM head on the last stage (what a cost model derived from
  ``tp1`` assumes);
* ``measured / simulated``: the exact 1F1B schedule (:func:`strategies.runtime.one_f_one_b`)
  replayed with the per-stage fits (forward ⅓, backward ⅔ of a micro-batch's time, free
  point-to-point): how much of the gap is the formula and how much is communication and
  overhead;
* the stage imbalance ``Σ T_1(m) / Σ T_0(m)`` (the last stage runs the LM head).

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

from balancer.cost import CostModel, LayoutCost  # noqa: E402
from balancer.data import read_lengths  # noqa: E402
from balancer.selector import Balancer, BalancerConfig  # noqa: E402
from strategies import ClusterSpec, Layout, Strategy  # noqa: E402
from strategies.runtime import (  # noqa: E402
    GPT,
    SINGLE_DEVICE,
    Engine,
    ModelConfig,
    StageSpec,
    check_micro_batch,
    one_f_one_b,
    prepare_micro_batch,
    run_local,
    stage_forward,
)
from strategies.runtime.pipeline import FORWARD, P2P, RECV, SEND, Compute  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PP2, TP1 = Layout(1, 1, 2), Layout(1)

SETTINGS: dict[str, Any] = {
    "model": dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=256),
    "max_length": 512, "tokens_per_step": 4096, "micro_batch_tokens": 1024,
    "calibration": (64, 128, 256, 384, 512), "repeats": 5, "steps": 20, "warmup": 2,
}
SMOKE: dict[str, Any] = {
    "model": dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128),
    "max_length": 128, "tokens_per_step": 512, "micro_batch_tokens": 256,
    "calibration": (32, 64, 128), "repeats": 1, "steps": 1, "warmup": 1,
}


# -- data -----------------------------------------------------------------------------------------
def global_batches(lengths: np.ndarray, tokens_per_step: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of lengths drawn without replacement, each up to ``tokens_per_step`` tokens."""
    order = np.random.default_rng(seed).permutation(lengths.size)
    out, cur, total = [], [], 0
    for i in np.tile(order, 1 + steps * tokens_per_step // max(1, int(lengths.sum()))):
        s = int(lengths[i])
        if total + s > tokens_per_step and cur:
            out.append(np.array(cur, dtype=np.int64))
            if len(out) == steps:
                break
            cur, total = [], 0
        cur.append(s)
        total += s
    return out


def pack(lens: list[int], vocab: int, seed: int, glt: int) -> dict[str, Any]:
    """A packed micro-batch (design.md §7) of random token ids, the same on every rank for one seed."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=int(sum(lens)), dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    labels = ids.copy()
    labels[cu[:-1]] = -100
    pos = np.arange(ids.size) - np.repeat(cu[:-1], lens)
    return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(pos)[None], "cu_seqlens": torch.from_numpy(cu),
            "global_loss_tokens": glt}


# -- calibration ----------------------------------------------------------------------------------
def time_parts(cfg: ModelConfig, parts: list[StageSpec | None], lengths: tuple[int, ...], repeats: int) -> np.ndarray:
    """Seconds (parts × lengths, min of ``repeats``) of forward + backward of one sequence per
    length: the whole model (``None``) or one stage. Parts and lengths are timed round-robin, so
    a burst of background load hits all of them alike."""
    torch.manual_seed(0)
    model = GPT(cfg)
    device = torch.device("cpu")
    batches = {s: prepare_micro_batch(check_micro_batch(pack([s], cfg.vocab_size, s, s - 1), 0, cfg.vocab_size),
                                      SINGLE_DEVICE, device) for s in lengths}

    def step(spec: StageSpec | None, s: int) -> None:
        if spec is None:
            model(batches[s]).backward()
        else:
            x = None if spec.first else torch.randn(s, cfg.hidden_size, requires_grad=True)
            y = stage_forward(model, spec, batches[s], SINGLE_DEVICE, x)
            y.backward() if spec.last else y.backward(torch.ones_like(y))
        model.zero_grad(set_to_none=True)

    best = np.full((len(parts), len(lengths)), np.inf)
    for r in range(repeats + 1):  # round 0 warms up
        for i, spec in enumerate(parts):
            for j, s in enumerate(lengths):
                t0 = time.perf_counter()
                step(spec, s)
                if r:
                    best[i, j] = min(best[i, j], time.perf_counter() - t0)
    return best


def fit(lengths: tuple[int, ...], seconds: np.ndarray, capacity: int) -> LayoutCost:
    return CostModel.fit(list(lengths), seconds.tolist(), token_capacity=capacity).cost(Layout(1))


# -- the exact schedule, replayed -----------------------------------------------------------------
def simulate_1f1b(stage_seconds: list[list[float]], forward_share: float = 1 / 3) -> float:
    """Makespan of the runtime's 1F1B op lists when stage ``p`` spends ``stage_seconds[p][k]`` on
    micro-batch ``k`` (forward ``forward_share`` of it, backward the rest) and point-to-point
    transfers are free but rendezvous (a transfer happens when both sides have posted it)."""
    pp, v = len(stage_seconds), len(stage_seconds[0])
    progs = [one_f_one_b(pp, p, v) for p in range(pp)]
    pos, clock = [0] * pp, [0.0] * pp
    pending: list[dict[P2P, float] | None] = [None] * pp  # open exchange: op → time it can complete
    posted = [0.0] * pp
    while any(pos[p] < len(progs[p]) for p in range(pp)):
        moved = False
        for p in range(pp):
            while pos[p] < len(progs[p]) and isinstance(progs[p][pos[p]], Compute):
                op = progs[p][pos[p]]
                share = forward_share if op.kind == FORWARD else 1 - forward_share
                clock[p] += share * stage_seconds[p][op.micro_batch]
                pos[p] += 1
                moved = True
            if pos[p] < len(progs[p]) and pending[p] is None:
                pending[p] = {o: -1.0 for o in progs[p][pos[p]].ops}
                posted[p] = clock[p]
                moved = True
        for p in range(pp):
            for o, t in (pending[p] or {}).items():
                q = p + o.peer_offset
                match = P2P(RECV if o.direction == SEND else SEND, o.what, o.micro_batch)
                if t < 0 and pending[q] is not None and match in pending[q]:
                    pending[p][o] = pending[q][match] = max(posted[p], posted[q])
                    moved = True
        for p in range(pp):
            if pending[p] is not None and all(t >= 0 for t in pending[p].values()):
                clock[p] = max([posted[p], *pending[p].values()])
                pending[p] = None
                pos[p] += 1
                moved = True
        if not moved:
            raise RuntimeError("simulate_1f1b: the schedule is stuck (a bug in one_f_one_b)")
    return max(clock)


# -- one rank ---------------------------------------------------------------------------------------
def run_rank(rank: int, world: int, env: dict[str, Any], lengths: np.ndarray) -> dict[str, Any] | None:
    cfg = ModelConfig(**env["model"])
    cal, cap = tuple(env["calibration"]), int(env["micro_batch_tokens"])
    # every rank times every part at once (the same contention for all parts); the ranks' mean
    parts = [None, *(StageSpec.of(cfg.num_layers, 2, p) for p in range(2))]
    seconds = torch.tensor(time_parts(cfg, parts, cal, env["repeats"]), dtype=torch.float64)
    dist.all_reduce(seconds)
    seconds /= world
    whole, stages = seconds[0], [seconds[1], seconds[2]]
    tp1 = fit(cal, whole.numpy(), cap)
    stage_fits = [fit(cal, s.numpy(), cap) for s in stages]
    busiest = fit(cal, torch.stack(stages).max(dim=0).values.numpy(), cap)
    planner = CostModel.from_coefficients({TP1: tp1, PP2: busiest})
    naive = LayoutCost(a=tp1.a / 2, b=tp1.b / 2, c=tp1.c, token_capacity=cap)

    cluster = ClusterSpec(num_ranks=world, ranks_per_node=world)
    strategies = {"tp1pp2x1": Strategy.homogeneous(PP2, world), "tp1x2": Strategy.homogeneous(TP1, world)}
    balancers = {n: Balancer(cluster, [s], planner, BalancerConfig(seed=0)) for n, s in strategies.items()}
    engine = Engine(list(strategies.values()), cfg,
                    lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1))
    batches = global_batches(np.minimum(lengths, env["max_length"]), env["tokens_per_step"],
                             env["warmup"] + env["steps"], seed=0)
    rows: list[dict[str, Any]] = []
    for k, lens in enumerate(batches):
        glt = int((lens - 1).sum())
        order = list(strategies) if k % 2 == 0 else list(reversed(strategies))
        for name in order:
            plan = balancers[name].plan(lens, step=k)
            mine_mbs = plan.for_rank(rank).micro_batches
            mbs = [pack([int(lens[i]) for i in mb], cfg.vocab_size, 1000 * k + j, glt) for j, mb in enumerate(mine_mbs)]
            result = engine.step(plan, mbs)
            rows.append(_row(k, name, plan, result.rank_seconds, lens, stage_fits, naive, env["warmup"]))
    if rank != 0:
        return None
    return {"fits": {"tp1": _coef(tp1), "stage0": _coef(stage_fits[0]), "stage1": _coef(stage_fits[1]),
                     "busiest": _coef(busiest)},
            "calibration_lengths": list(cal), "stage_seconds": [s.tolist() for s in stages],
            "tp1_seconds": whole.tolist(), "rows": rows}


def _coef(c: LayoutCost) -> dict[str, float]:
    return {"a": c.a, "b": c.b, "c": c.c}


def _row(k: int, name: str, plan: Any, rank_seconds: tuple[float, ...], lens: np.ndarray,
         stage_fits: list[LayoutCost], naive: LayoutCost, warmup: int) -> dict[str, Any]:
    row: dict[str, Any] = {"step": k, "warmup": k < warmup, "strategy": name, "tokens": int(lens.sum()),
                           "replicas": []}
    for rep in plan.replicas:
        mbs = [np.array([int(lens[i]) for i in mb], dtype=np.int64) for mb in rep.micro_batches]
        measured = max(rank_seconds[r] for r in rep.ranks)
        entry = {"ranks": list(rep.ranks), "micro_batches": len(mbs), "estimate_s": rep.est_seconds,
                 "measured_s": measured}
        if rep.layout.pp > 1:
            per_stage = [[float(f.seconds(m).sum() + f.c) for m in mbs] for f in stage_fits]
            naive_t = [float(naive.seconds(m).sum()) for m in mbs]
            entry.update(
                naive_s=sum(naive_t) + len(mbs) * naive.c + max(naive_t),
                simulated_s=simulate_1f1b(per_stage),
                stage_imbalance=sum(per_stage[1]) / sum(per_stage[0]),
            )
        row["replicas"].append(entry)
    return row


# -- report ---------------------------------------------------------------------------------------
def summarise(res: dict[str, Any]) -> dict[str, float]:
    timed = [r for r in res["rows"] if not r["warmup"]] or res["rows"]
    pp = [r["replicas"][0] for r in timed if r["strategy"] == "tp1pp2x1"]
    dp = [rep for r in timed if r["strategy"] == "tp1x2" for rep in r["replicas"] if rep["estimate_s"] > 0]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    out = {
        "pp2_measured_over_planner": med([e["measured_s"] / e["estimate_s"] for e in pp]),
        "pp2_measured_over_naive": med([e["measured_s"] / e["naive_s"] for e in pp]),
        "pp2_measured_over_simulated": med([e["measured_s"] / e["simulated_s"] for e in pp]),
        "pp2_planner_over_simulated": med([e["estimate_s"] / e["simulated_s"] for e in pp]),
        "tp1_measured_over_estimate": med([e["measured_s"] / e["estimate_s"] for e in dp]),
        "stage_imbalance": med([e["stage_imbalance"] for e in pp]),
        "pp2_micro_batches": med([e["micro_batches"] for e in pp]),
        "pp2_measured_s": med([e["measured_s"] for e in pp]),
        "pp2_planner_s": med([e["estimate_s"] for e in pp]),
        "timed_steps": len(pp),
    }
    # the same batch's two runs are adjacent in time and see the same machine load: pair them
    paired = []
    for k in sorted({r["step"] for r in timed}):
        by = {r["strategy"]: r for r in timed if r["step"] == k}
        e = by["tp1pp2x1"]["replicas"][0]
        reps = [x for x in by["tp1x2"]["replicas"] if x["estimate_s"] > 0]
        control = sum(x["measured_s"] for x in reps) / sum(x["estimate_s"] for x in reps)
        paired.append(e["measured_s"] / e["estimate_s"] / control)
    out["pipeline_model_error"] = med(paired)
    out["pipeline_model_error_range"] = [float(min(paired)), float(max(paired))]
    return out


def markdown(res: dict[str, Any]) -> str:
    s, m, info = res["summary"], res["settings"]["model"], res["machine"]
    f = res["result"]["fits"]
    head = (
        f"Pipeline benchmark on **{info['cpu']}** ({info['cpus']} cores, load {info['load']}), torch "
        f"{info['torch']}, {res['date']}. Command: `{res['command']}`. Lengths: {res['lengths']} capped at "
        f"{res['settings']['max_length']} tokens, {res['settings']['tokens_per_step']:,} tokens per step, "
        f"{res['settings']['micro_batch_tokens']:,} per micro-batch. Model: hidden {m['hidden_size']}, "
        f"{m['num_layers']} layers (pp2: blocks 0–{m['num_layers'] // 2 - 1} + embedding | "
        f"blocks {m['num_layers'] // 2}–{m['num_layers'] - 1} + final norm + LM head), vocab {m['vocab_size']}, "
        f"ffn {m['ffn_hidden_size']}. Two gloo processes, one thread each; pp2 (one pipeline) and tp1×2 (the "
        "control) run the same batches, alternating. Costs calibrated here: every rank times the whole model "
        "and each stage (round-robin, at once), the ranks' mean is fitted; the planner prices pp2 with the "
        f"busiest stage's fit. Medians over {s['timed_steps']} timed steps; measured = a replica's forward + "
        "backward wall time."
    )
    fits = ("Fits (seconds; t(s) = a·s² + b·s, c per micro-batch): "
            + "; ".join(f"{k} a={v['a']:.3g} b={v['b']:.3g} c={v['c']:.3g}" for k, v in f.items()) + ".")
    lo, hi = s["pipeline_model_error_range"]
    planner_row = ("| pp2 measured / planner estimate `(Σ T + v·c + (pp−1)·max T)` | "
                   f"**{s['pp2_measured_over_planner']:.2f}** |")
    lines = [
        head,
        "",
        "| quantity | value |",
        "|---|---|",
        planner_row,
        f"| tp1×2 measured / estimate (control, same calibration) | {s['tp1_measured_over_estimate']:.2f} |",
        "| pipeline model error = the two ratios' quotient per step (median; range) | "
        f"**{s['pipeline_model_error']:.2f}** ({lo:.2f}–{hi:.2f}) |",
        f"| pp2 measured / naive estimate (tp1 fit ÷ pp, head ignored) | {s['pp2_measured_over_naive']:.2f} |",
        f"| pp2 measured / exact 1F1B replayed with the stage fits | {s['pp2_measured_over_simulated']:.2f} |",
        f"| planner formula / exact 1F1B replay (same costs) | {s['pp2_planner_over_simulated']:.2f} |",
        f"| stage imbalance Σ T₁ / Σ T₀ (last stage runs the LM head) | {s['stage_imbalance']:.2f} |",
        f"| pp2 micro-batches per step | {s['pp2_micro_batches']:.0f} |",
        f"| pp2 measured s / planner s | {s['pp2_measured_s']:.4f} / {s['pp2_planner_s']:.4f} |",
        "",
        fits,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="code_kafka", help="bundled length file name or a Parquet path")
    p.add_argument("--steps", type=int, default=None, help="timed steps per strategy (default 20)")
    p.add_argument("--smoke", action="store_true", help="tiny model, one step: check the script runs")
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
