"""benchmarks/loader_stream.py: a tiny run on 2 gloo ranks, its table's internal consistency, and the docs' quotes."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loader_stream.json"
TINY = ["--num-samples", "96", "--tokens-per-step", "8192", "--max-length", "4096", "--world-size", "2",
        "--step-ms", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("loader_stream") / "loader_stream.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_stream.py"), *TINY, "--out", str(out)],
                   check=True, cwd=ROOT, env=env, timeout=120, capture_output=True)
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def _check(result: dict[str, Any]) -> None:
    """Every row: counts add up to the stream, bytes per token are bytes over tokens, ratios are the rows'."""
    for run in result["runs"]:
        world = run["world_size"]
        rows = {(r["format"], r["stream"], r["mode"], r["step"]): r for r in run["rows"]}
        assert {k[2] for k in rows} == {"replicated", "per_rank"} and {k[3] for k in rows} == {"none", "sleep"}
        for (fmt, stream, mode, kind), r in rows.items():
            ranks = r["per_rank"]
            assert len(ranks) == world
            assert r["replica_tokens"] == r["stream_tokens"] == result["stream_tokens"]  # every token trained once
            assert r["tokens"] == sum(x["tokens"] for x in ranks) >= r["stream_tokens"]  # tp peers count their replica's
            assert all(x["steps"] == r["steps"] for x in ranks)
            if mode == "replicated":
                assert all(x["samples_read"] == result["num_samples"] for x in ranks)
                assert r["received_bytes"] == 0 and r["received_bytes_per_token"] == 0
            else:
                assert sum(x["samples_read"] for x in ranks) == result["num_samples"]  # each sample read by one rank
                assert r["received_bytes"] == sum(x["received_bytes"] for x in ranks) > 0
                assert math.isclose(r["received_bytes_per_token"], r["received_bytes"] / r["tokens"])
                assert math.isclose(r["received_bytes_per_received_token"], r["received_bytes"] / r["received_tokens"])
                assert math.isclose(r["received_bytes_per_rank_per_step"], r["received_bytes"] / world / r["steps"])
                # A received token costs its pickled size: 1-3 bytes per int (+ framing) in a list, 8 in an int64 array.
                low, high = (1.0, 4.0) if fmt == "list" else (8.0, 9.0)
                assert low < r["received_bytes_per_received_token"] < high, (fmt, r["received_bytes_per_received_token"])
            assert r["tokens_per_second"] > 0 and r["stream_tokens_per_second"] > 0
            # The loader's own counters (loader.stats): replicated pickles and moves no sample.
            assert r["read_cpu_ms_per_step"] > 0 and r["collectives_wall_ms_per_step"] > 0 and r["plan_ms_per_step"] > 0
            assert (r["exchange_cpu_ms_per_step"] > 0) == (mode == "per_rank") and r["exchange_cpu_ms_per_step"] >= 0
            assert math.isclose(r["stream_tokens_per_step"], r["stream_tokens"] / r["steps"])
        for q in run["ratios"]:
            pr, rep = (rows[(q["format"], q["stream"], m, q["step"])] for m in ("per_rank", "replicated"))
            assert math.isclose(q["tokens_per_second"], pr["tokens_per_second"] / rep["tokens_per_second"])
            assert math.isclose(q["stream_tokens_per_second"], pr["stream_tokens_per_second"] / rep["stream_tokens_per_second"])
            assert math.isclose(q["samples_read_per_rank"], 1 / world)
        assert len(run["ratios"]) == len(rows) // 2


def test_tiny_run_adds_up_and_the_table_shows_it(tiny: tuple[dict[str, Any], str]) -> None:
    result, md = tiny
    assert result["command"] == "python benchmarks/loader_stream.py " + " ".join([*TINY, "--out", result["command"].split("--out ")[1]])
    _check(result)
    for row in result["runs"][0]["rows"]:
        assert f"| {row['format']} | {row['stream']} | {row['mode']} | {row['step']} | {row['steps']} (" in md
        assert f"{row['received_bytes_per_rank_per_step']:,.0f} | {row['received_bytes_per_token']:.2f} / " in md


def test_the_committed_results_are_the_default_run_and_the_docs_quote_them() -> None:
    result = json.loads(RESULTS.read_text())
    assert result["command"] == "python benchmarks/loader_stream.py"
    assert [run["world_size"] for run in result["runs"]] == [2, 4]
    _check(result)
    doc = (ROOT / "docs" / "dataloader.md").read_text()
    assert "benchmarks/results/loader_stream.md" in doc
    cost = doc[doc.index("*Cost* (what each rank receives per step)") :]
    cost = cost[: cost.index("*Guarantees*")]
    quoted = set(re.findall(r"\d+\.\d\d", cost))
    for run in result["runs"]:
        for r in run["rows"]:
            if r["mode"] == "per_rank" and r["stream"] == "torch" and r["step"] == "none":
                assert f"{r['received_bytes_per_token']:.2f}" in quoted, (run["world_size"], r["format"])
                if run["world_size"] == 2:
                    assert f"{r['received_bytes_per_received_token']:.2f}" in quoted, r["format"]
