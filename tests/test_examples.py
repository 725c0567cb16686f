"""Smoke tests of the integration examples: each runs as a user would run it, with small sizes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env() -> dict[str, str]:
    # One torch thread per process: the machine may have 2 cores for 2 ranks.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", stdout)]


# ~10-20 s: two launches (1 process, and 2 processes under torchrun) started together.
def test_plain_pytorch_loop_gives_the_same_losses_on_one_and_two_ranks(tmp_path: Path) -> None:
    flags = ["--steps", "3", "--num-samples", "600", "--tokens-per-step", "4096"]
    script = str(EXAMPLES / "plain_pytorch_loop.py")
    single = subprocess.Popen([sys.executable, script, *flags], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dual = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, *flags], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out1, err1 = single.communicate(timeout=280)
    out2, err2 = dual.communicate(timeout=280)
    assert single.returncode == 0, err1[-3000:]
    assert dual.returncode == 0, err2[-3000:]
    assert "1 rank(s)" in out1 and "2 rank(s)" in out2
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 3
    # Balanced packing changes who computes what, never the step's gradient: the global
    # token-mean loss of every step is the same on one rank and on two.
    assert l1 == pytest.approx(l2, abs=2e-4)
    assert l1[-1] < l1[0]


# ~20-30 s: importing transformers dominates.
def test_hf_trainer_trains_balanced_steps_on_a_tiny_llama(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'accelerate>=1.1')")
    run = subprocess.run([sys.executable, str(EXAMPLES / "hf_trainer.py"), "--steps", "3", "--num-samples", "400",
                          "--output-dir", str(tmp_path / "out")], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    m = re.search(r"trained (\d+) balanced steps; losses \[([^\]]*)\]", run.stdout)
    assert m, run.stdout
    losses = [float(x) for x in m.group(2).split(",")]
    assert int(m.group(1)) == 3 and len(losses) == 3
    assert losses[-1] < losses[0]


# ~15 s warm: four ranks under torchrun, the README's runtime example with fewer steps.
def test_train_gpt_balanced_runs_on_four_cpu_ranks(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                          str(EXAMPLES / "train_gpt_balanced.py"), "--steps", "3"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 ranks on cpu" in run.stdout, run.stdout
    layouts = re.search(r"layouts: (.+) \(", run.stdout)
    assert layouts and "tp1pp2" in layouts.group(1).split(", "), run.stdout  # pipelines are candidates by default
    candidates = re.search(r"candidates: (.+)", run.stdout)
    assert candidates, run.stdout
    names = [c.strip() for c in candidates.group(1).split(",")]
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", run.stdout, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2], run.stdout
    for _, strategy, est, measured, step_s, loss in rows:
        assert strategy in names  # every step ran one of the built candidates
        assert float(est) > 0 and float(measured) > 0 and float(step_s) >= float(measured) * 0.5
        assert 0 < float(loss) < 10
    # It trains: the synthetic sequences are learnable in context, and the global batches (hence the
    # losses) do not depend on which strategy each step ran. Seen: 5.560, 5.517, 5.476.
    losses = [float(r[5]) for r in rows]
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.02, losses
