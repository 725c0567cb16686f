"""The ``hydraulis`` CLI, driven as a user would: subprocesses, files in, files and text out."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from balancer.pool import load_candidates
from balancer.profile import LengthProfile

RNG = np.random.default_rng(0)
LENGTHS = np.concatenate([RNG.lognormal(6.0, 1.0, 400).astype(np.int64) + 1, [9000, 15000]])
WORDS = ["alpha", "beta", "gamma", "delta"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hydraulis(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (``python -m hydraulis.cli``, the console script's target)."""
    env = {**os.environ, "HYDRAULIS_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "hydraulis.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small inputs: token-list Parquet, a length file, JSONL text + tokenizer, bad files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("cli")
    pq.write_table(pa.table({"input_ids": [list(range(n)) for n in LENGTHS], "id": np.arange(LENGTHS.size)}),
                   d / "tokens.parquet")
    pq.write_table(pa.table({"length": LENGTHS}), d / "lengths.parquet")
    counts = RNG.integers(1, 40, size=200)
    texts = [" ".join(RNG.choice(WORDS, size=n)) for n in counts]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "lang": "en"}) + "\n" for t in texts))
    np.save(d / "word_counts.npy", counts)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(200)) + b"PAR1")
    (d / "bad_key.yaml").write_text("model: {preset: llama-7b, num_layer: 4}\ncluster: {num_ranks: 8, hardware: h100-80g}\n")
    (d / "job.toml").write_text('model = "llama-7b"\n[cluster]\nnum_ranks = 8\nhardware = "h100-80g"\n')
    return d


def test_help_lists_every_command(data: Path) -> None:
    exe = shutil.which("hydraulis")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "hydraulis.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("profile", "plan", "simulate", "calibrate", "measure", "demo"):
        assert name in out.stdout
    sub = hydraulis("plan", "--help", cwd=data)
    assert sub.returncode == 0 and "--tokens-per-step" in sub.stdout and "--max-length" in sub.stdout


def test_profile_token_parquet_writes_profile_table_and_plots(data: Path, tmp_path: Path) -> None:
    out = hydraulis("profile", str(data / "tokens.parquet"), "--model", "llama-7b", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "column 'input_ids': token-id lengths" in out.stdout
    assert "| p99" in out.stdout and "where the time goes" in out.stdout
    prof = LengthProfile.load(tmp_path / "profile.json")
    assert prof.num_sequences == LENGTHS.size and prof.total_tokens == int(LENGTHS.sum())
    assert prof.max_length == 15000 and prof.meta["column"] == "input_ids"
    assert prof.meta["time_share"]["a"] > 0
    for png in ("length_histogram.png", "time_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_profile_text_column_with_local_tokenizer(data: Path, tmp_path: Path) -> None:
    out = hydraulis("profile", str(data / "corpus.jsonl"), "--tokenizer", str(data / "tokenizer.json"),
                    "--out", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    prof = LengthProfile.load(tmp_path / "profile.json")
    counts = np.load(data / "word_counts.npy")
    assert prof.num_sequences == counts.size and prof.total_tokens == int(counts.sum())
    assert prof.meta["kind"] == "text" and prof.meta["tokenizer"].endswith("tokenizer.json")
    assert not (tmp_path / "time_share.png").exists()


def test_plan_then_simulate_with_the_plan_s_candidates(data: Path, tmp_path: Path) -> None:
    plan = hydraulis("plan", "--lengths", str(data / "lengths.parquet"), "--config", str(data / "job.toml"),
                     "--tokens-per-step", "256K", "--num-candidates", "4", "--out", str(tmp_path / "c.json"),
                     cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "tokens per step: 262,144" in plan.stdout and "layouts that fit memory" in plan.stdout
    pool = load_candidates(tmp_path / "c.json")
    assert 1 <= len(pool.strategies) <= 4 and pool.num_ranks == 8 and pool.max_length == 15000
    assert pool.meta["job"]["tokens_per_step"] == 262144
    assert pool.strategies[0].name in plan.stdout

    sim = hydraulis("simulate", "--lengths", str(data / "lengths.parquet"), "--cluster", "8xH100", "--model",
                    "llama-7b", "--candidates", str(tmp_path / "c.json"), "--tokens-per-step", "256K", "--steps", "3",
                    "--out", str(tmp_path / "sim"), cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    result = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    from balancer.baselines import BASELINES

    assert set(result["policies"]) == {"balancer", *BASELINES}  # every baseline (refused steps are listed)
    assert result["num_candidates"] == len(pool.strategies)
    assert "estimated speedup over the best baseline" in sim.stdout
    assert (tmp_path / "sim" / "simulation.png").read_bytes()[:8] == PNG_MAGIC


def test_simulate_from_a_profile_with_chosen_policies(data: Path, tmp_path: Path) -> None:
    prof = LengthProfile.from_lengths(LENGTHS, source="test")
    prof.save(tmp_path / "p.json")
    sim = hydraulis("simulate", "--profile", str(tmp_path / "p.json"), "--cluster", "16xA100", "--model", "llama-7b",
                    "--policies", "balancer,multipack", "--steps", "2", "--max-length", "8192", "--no-plots",
                    "--out", str(tmp_path / "sim"), cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    result = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert set(result["policies"]) == {"balancer", "multipack"} and result["max_length"] == 8192
    assert "cut to it by the loader's overlong policy" in sim.stdout


def test_calibrated_cost_model_feeds_plan(data: Path, tmp_path: Path) -> None:
    cal = hydraulis("calibrate", "--model", "tiny", "--budget", "256", "--lengths", "sft_gpteacher",
                    "--repeats", "1", "--warmup", "0", "--threads", "1", "--token-capacity", "20000",
                    "--out", str(tmp_path / "cost.json"), cwd=tmp_path)
    assert cal.returncode == 0, cal.stderr
    assert "R² =" in cal.stdout and "wrote" in cal.stdout
    assert "| 64×4 " in cal.stdout and "| drawn 1: " in cal.stdout  # every composition, measured vs fitted
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["version"] == 2 and cost["source"] == "calibrated"
    assert cost["layouts"]["tp1"]["token_capacity"] == 20000 and "d" in cost["layouts"]["tp1"]
    plan = hydraulis("plan", "--lengths", str(data / "lengths.parquet"), "--cluster", "2xcpu", "--cost-model",
                     str(tmp_path / "cost.json"), "--tokens-per-step", "32K", "--out", str(tmp_path / "c.json"),
                     cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "calibrated cost model from" in plan.stdout
    assert [s.name for s in load_candidates(tmp_path / "c.json").strategies] == ["tp1x2"]


def test_calibrate_strict_fails_a_launch_bound_fit(tmp_path: Path) -> None:
    """Micro-batches of at most 16 tokens of the tiny model: the CPU waits on launches, not on
    work (c is 60-80 % of every time, by the process clock, which other jobs cannot inflate).
    The fit is reported unreliable; --strict makes that exit status 3 (JSON still written)."""
    cal = hydraulis("calibrate", "--model", "tiny", "--budget", "16", "--repeats", "3", "--threads", "1",
                    "--clock", "process", "--strict", "--out", str(tmp_path / "cost.json"), cwd=tmp_path)
    assert cal.returncode == 3, cal.stdout + cal.stderr
    assert "warning: calibration unreliable: measured fit: launch-bound" in cal.stdout
    assert json.loads((tmp_path / "cost.json").read_text())["meta"]["reliable"] is False


def test_measure_runs_every_policy_replica_by_replica(data: Path, tmp_path: Path) -> None:
    out = hydraulis("measure", "--model", "tiny", "--cluster", "2xcpu", "--lengths", str(data / "lengths.parquet"),
                    "--tokens-per-step", "3K", "--token-capacity", "512", "--steps", "1", "--repeats", "1",
                    "--policies", "balancer,padded,multipack", "--threads", "1", "--clock", "process",
                    "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "measured step s" in out.stdout and "median |ratio − 1|" in out.stdout
    got = json.loads((tmp_path / "measured.json").read_text())
    assert set(got["summary"]) == {"balancer", "padded", "multipack"} and got["token_capacity"] == 512
    for plan in got["plans"]:
        assert len(plan["replicas"]) == 2
        assert plan["measured_step_seconds"] == max(r["measured_seconds"] for r in plan["replicas"]) > 0
    assert (tmp_path / "plans.jsonl").read_text().count("\n") == 3
    assert json.loads((tmp_path / "cost_model.json").read_text())["layouts"]["tp1"]["token_capacity"] == 512


BAD_INPUTS = {
    "missing file": (["profile", "{d}/nope.parquet"], "does not exist"),
    "wrong column": (["profile", "{d}/tokens.parquet", "--column", "ids"], "has no column 'ids'; columns: input_ids"),
    "corrupt parquet": (["profile", "{d}/corrupt.parquet"], "cannot read"),
    "text without tokenizer": (["profile", "{d}/corpus.jsonl"], "holds text; pass --tokenizer tokenizer.json"),
    "bad config key": (["plan", "--lengths", "{d}/lengths.parquet", "--config", "{d}/bad_key.yaml"],
                       "unknown key 'num_layer'; did you mean 'num_layers'?"),
    "cluster not whole nodes": (["plan", "--lengths", "{d}/lengths.parquet", "--cluster", "12xH100", "--model",
                                 "llama-7b"], "12 ranks are not whole nodes of 8; use 8 or 16"),
    "unknown model preset": (["simulate", "--lengths", "{d}/lengths.parquet", "--cluster", "8xH100", "--model",
                              "llama-8b"], "unknown model preset 'llama-8b'; valid presets:"),
    "unknown policy": (["simulate", "--lengths", "{d}/lengths.parquet", "--cluster", "8xH100", "--model", "llama-7b",
                        "--policies", "balancer,fifo"], "unknown policy 'fifo'"),
    "missing cost model": (["plan", "--lengths", "code_kafka", "--cluster", "8xH100", "--cost-model", "{d}/none.json"],
                           "cost model file"),
    "profile is a folder": (["plan", "--profile", "{d}", "--cluster", "8xH100", "--model", "llama-7b"],
                            "is a folder without a profile.json; pass the profile JSON file"),
    "profile is a data file": (["plan", "--profile", "{d}/tokens.parquet", "--cluster", "8xH100", "--model", "llama-7b"],
                               "profile it first with `hydraulis profile"),
}


@pytest.fixture(scope="module")
def bad_runs(data: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every bad-input command, started together (each is mostly interpreter start-up)."""
    env = {**os.environ, "HYDRAULIS_DEBUG": ""}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "hydraulis.cli", *(a.format(d=data) for a in argv)], cwd=data,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, (argv, _) in BAD_INPUTS.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_without_traceback(case: str, bad_runs: dict) -> None:
    run = bad_runs[case]
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("hydraulis: error: ")
    assert BAD_INPUTS[case][1] in lines[0]
    assert "Traceback" not in run.stderr


def test_debug_flag_shows_the_traceback(data: Path) -> None:
    run = hydraulis("profile", str(data / "nope.parquet"), "--debug", cwd=data)
    assert run.returncode != 0 and "Traceback" in run.stderr


# Slow (~15-30 s on 2 cores): the whole demo with --quick settings, including two CPU
# training processes; the default settings are timed by hand (docs/quickstart.md).
def test_demo_quick_runs_every_stage(tmp_path: Path) -> None:
    run = hydraulis("demo", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("[1/4] profile", "[2/4] plan", "[3/4] simulate", "[4/4] train", "summary"):
        assert stage in run.stdout
    assert "estimated speedup over the best baseline" in run.stdout
    assert "tokens/s" in run.stdout and "losses differ by at most" in run.stdout
    assert "rank compute in CPU time" in run.stdout and "the fastest rank waits" in run.stdout
    out = tmp_path / "demo"
    names = {p.name for p in out.iterdir()}
    assert {"profile.json", "length_histogram.png", "time_share.png", "candidates.json", "simulation.json",
            "simulation.png", "training.json"} <= names
    training = json.loads((out / "training.json").read_text())
    bal, base = training["runs"]["balancer"], training["runs"]["multipack"]
    assert len(bal) == len(base) == 3
    for a, b in zip(bal, base):  # same global batches, exact gradients → same losses
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-4


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["plan", "--lengths", "code_kafka", "--tokens-per-stepp", "1M"], "usage: hydraulis plan",
         "--tokens-per-stepp → did you mean --tokens-per-step?"),
        (["simulate", "--lengths", "code_kafka", "--clster", "8xH100"], "usage: hydraulis simulate",
         "--clster → did you mean --cluster?"),
        (["plna", "--lengths", "code_kafka"], "usage: hydraulis ", "did you mean `hydraulis plan`?"),
    ],
    ids=["plan-option", "simulate-option", "command"],
)
def test_typos_show_the_subcommand_usage_and_the_nearest_name(argv: list[str], usage: str, hint: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from hydraulis.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(usage) and hint in err


def test_candidate_table_never_calls_a_candidate_that_cannot_hold_the_longest_best(
        capsys: pytest.CaptureFixture[str]) -> None:
    from balancer.pool import CandidatePool
    from hydraulis.commands.plan import print_pool
    from strategies import Layout, Strategy

    pool = CandidatePool(
        strategies=(Strategy.homogeneous(Layout(8), 8), Strategy.homogeneous(Layout(2), 8)),
        expected_seconds=(15.0, 9.0),  # the second is faster on the batches it can hold
        max_length=100_000, num_ranks=8,
        meta={"capacity": [120_000, 40_000], "coverage": [1.0, 0.5], "num_sample_batches": 8, "num_generated": 2},
    )
    print_pool(pool, 1 << 20, "s")
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")][1:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][3] == "all" and cells[0][-1] == "1.00×"
    assert cells[1][3] == "≤ 40,000 ✗" and cells[1][4] == "9.00 s (4 of 8 batches)" and cells[1][-1] == "cannot hold"
