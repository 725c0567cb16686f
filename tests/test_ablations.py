"""benchmarks/ablations.py: the --quick smoke run, its records, and the docs that quote its results."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ablations.json"


def _ablations():
    spec = importlib.util.spec_from_file_location("ablations_bench", ROOT / "benchmarks" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


ablations = _ablations()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("ablations")
    assert ablations.main(["--quick", "--out-dir", str(out)]) == 0
    return json.loads((out / "ablations_quick.json").read_text()), (out / "ablations_quick.md").read_text()


def test_quick_static_layouts_hold_max_length_and_the_verdict_follows_the_numbers(quick: tuple[dict, str]) -> None:
    from balancer.baselines import static_layout
    from balancer.candidates import enumerate_layouts
    from strategies.layout import ClusterSpec

    res, md = quick
    assert res["invocation"] == "python benchmarks/ablations.py --quick" and res["steps"] == ablations.QUICK_STEPS
    assert res["static_layouts"], "no static-layout record"
    scenarios = {s.name: s for s in ablations.planner.SCENARIOS}
    for rec in res["static_layouts"]:
        scn = scenarios[rec["scenario"]]
        assert 16 <= scn.num_gpus <= 64
        cluster = ClusterSpec(num_ranks=scn.num_gpus, ranks_per_node=8)
        cost = ablations.planner.scenario_cost_model(scn)
        pool = enumerate_layouts(cluster, cost, allow_pp=scn.cost == "hydraulis")
        holding = {lay.name for lay in pool if cost.token_capacity(lay) >= scn.max_length}
        assert {r["layout"] for r in rec["layouts"]} == holding  # every one of them, no other
        assert rec["static_layout"] == static_layout(cluster, cost, scn.max_length).name
        for p in ablations.STATIC_POLICIES:
            tps = {r["layout"]: r["tokens_per_second"][p] for r in rec["layouts"]}
            assert all(v > 0 for v in tps.values())
            v = rec["verdict"][p]
            assert v["fastest"] == max(tps, key=tps.__getitem__)
            assert v["pick_is_fastest"] == (v["fastest"] == rec["static_layout"])
            assert math.isclose(v["pick_over_fastest"], tps[rec["static_layout"]] / max(tps.values()))
        assert f"**{rec['static_layout']}**" in md


def test_quick_regime_mixes_compare_the_two_pools_on_the_same_batches(quick: tuple[dict, str]) -> None:
    res, md = quick
    assert {r["scenario"] for r in res["regime_mixes"]} == {"7b-16gpu-32k", "hydraulis13b-64gpu-400k"}
    for rec in res["regime_mixes"]:
        on, off = rec["with_regime_mixes"], rec["without_regime_mixes"]
        assert on["pool"] and off["pool"]
        assert math.isclose(rec["tokens_per_second_ratio"], on["tokens_per_second"] / off["tokens_per_second"])
        assert 0 <= rec["steps_on_strategies_missing_without"] <= rec["steps"]
        assert on["plan_ms_median"] > 0 and off["plan_ms_median"] > 0
        assert f"{rec['tokens_per_second_ratio']:.3f}×" in md
    if any(sorted(r["with_regime_mixes"]["pool"]) == sorted(r["without_regime_mixes"]["pool"]) for r in res["regime_mixes"]):
        pytest.fail("regime_mixes=False built the same pool: the ablation compares nothing")


def test_the_docs_quote_the_committed_results() -> None:
    """docs/balancer.md's regime-mix ratios and docs/baselines.md's layout figures are the
    committed default run's (``benchmarks/results/ablations.json``)."""
    res = json.loads(RESULTS.read_text())
    assert res["invocation"] == "python benchmarks/ablations.py"
    ratios = {f"{r['tokens_per_second_ratio']:.3f}" for r in res["regime_mixes"]}
    balancer_md = (ROOT / "docs" / "balancer.md").read_text()
    start = balancer_md.index("3. **Heterogeneous mixes**")
    para = balancer_md[start:balancer_md.index("\n4. ", start)]
    assert "benchmarks/results/ablations.md" in para
    quoted = re.findall(r"(\d+\.\d+)×", para)  # every ratio, at the results table's three decimals
    assert quoted and set(quoted) <= ratios, sorted(set(quoted) - ratios)

    figures = {f"{lay['tokens_per_second'][p] / 1e3:.1f}K" for r in res["static_layouts"] for lay in r["layouts"]
               for p in ablations.STATIC_POLICIES}
    baselines_md = (ROOT / "docs" / "baselines.md").read_text()
    para = baselines_md[baselines_md.index("**Is it the best static layout?**"):]
    para = para[:para.index("\n\n")]
    assert "benchmarks/results/ablations.md" in para
    quoted = re.findall(r"(\d+\.\dK)", para)
    assert quoted and set(quoted) <= figures, sorted(set(quoted) - figures)
    margins = {f"{v['pick_over_fastest']:.3f}" for r in res["static_layouts"] for v in r["verdict"].values()}
    quoted = re.findall(r"(\d+\.\d+)×", para)
    assert set(quoted) <= margins, sorted(set(quoted) - margins)
