"""CP-SAT models: never worse than the hint, every status handled, LNS for large instances."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import packers as P


def _instance(seed: int, n: int, m: int, num_types: int = 2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4000, size=n)
    a = rng.uniform(1e-8, 1e-6, size=num_types)
    b = rng.uniform(1e-4, 1e-3, size=num_types)
    times = a[None, :] * lengths[:, None] ** 2 + b[None, :] * lengths[:, None]
    times[:, 1:][lengths > 3000] = np.inf  # only type 0 takes the longest items
    bin_type = np.arange(m) % num_types
    return times, bin_type, lengths, rng


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 14), st.integers(1, 4), st.booleans())
def test_cpsat_never_worse_than_greedy_and_bound_valid(seed, n, m, pipeline):
    times, bin_type, lengths, rng = _instance(seed, n, m)
    pp = rng.integers(0, 2, size=m).astype(float) if pipeline else None
    speed = rng.uniform(0.6, 1.4, size=m)
    greedy = P.lpt_makespan(times, bin_type, speed=speed, pp_weight=pp)
    c = P.cpsat_makespan(times, bin_type, speed=speed, pp_weight=pp, time_limit=1.0)
    assert c.makespan <= greedy.makespan
    assert np.isfinite(times[np.arange(n), bin_type[c.bin_of]]).all()
    np.testing.assert_array_equal(c.loads, P.makespan_loads(times, bin_type, c.bin_of, speed, pp))
    if c.bound is not None:
        assert c.bound <= c.makespan * (1 + 1e-9)
        assert c.bound <= greedy.makespan * (1 + 1e-9)
    assert c.status in {"OPTIMAL", "FEASIBLE", "UNKNOWN", "INFEASIBLE", "MODEL_INVALID"}


def test_zero_time_limit_falls_back_to_the_hint():
    times, bin_type, _, _ = _instance(1, 30, 4)
    hint = P.lpt_makespan(times, bin_type).bin_of
    c = P.cpsat_makespan(times, bin_type, hint=hint, time_limit=0.0)
    assert c.status == "UNKNOWN"
    assert c.solver == "hint;cpsat:UNKNOWN"
    np.testing.assert_array_equal(c.bin_of, hint)


def test_bad_hint_is_improved_and_optimality_proved():
    times = np.array([[3.0], [3.0], [2.0], [2.0], [2.0]])
    bin_type = np.zeros(2, dtype=np.int64)
    c = P.cpsat_makespan(times, bin_type, hint=np.zeros(5, dtype=np.int64), time_limit=5.0, require_nonempty=False)
    assert c.status == "OPTIMAL" and c.solver == "cpsat:OPTIMAL"
    assert c.makespan == 6.0 and abs(c.bound - 6.0) < 1e-6


def test_capacity_and_nonempty_constraints():
    times = np.ones((6, 1))
    sizes = np.array([5, 5, 5, 1, 1, 1])
    c = P.cpsat_makespan(times, np.zeros(3, dtype=np.int64), sizes=sizes, bin_capacity=np.array([6, 6, 6]), time_limit=2.0)
    assert (np.bincount(c.bin_of, weights=sizes, minlength=3) <= 6).all()
    assert (np.bincount(c.bin_of, minlength=3) >= 1).all()
    assert c.makespan == 2.0


def test_large_instance_uses_lns_and_keeps_the_hint_quality():
    times, bin_type, _, _ = _instance(7, 400, 8)
    greedy = P.lpt_makespan(times, bin_type)
    c = P.cpsat_makespan(times, bin_type, hint=greedy.bin_of, time_limit=0.3, max_model_pairs=500)
    assert "cpsat-lns" in c.solver
    assert c.bound is None
    assert c.makespan <= greedy.makespan
    assert np.isfinite(times[np.arange(400), bin_type[c.bin_of]]).all()


def test_minmax_cpsat_optimal_on_small_case():
    times = np.array([4.0, 3.0, 3.0, 2.0, 2.0, 2.0])
    sizes = np.array([4, 3, 3, 2, 2, 2])
    c = P.cpsat_minmax_pack(times, sizes, 2, 9, time_limit=5.0)
    assert c.status == "OPTIMAL" and c.makespan == 8.0
    assert (np.bincount(c.bin_of, weights=sizes, minlength=2) <= 9).all()
    greedy = P.minmax_pack(times, sizes, 2, 9)
    assert c.makespan <= greedy.makespan


_REPRO_SCRIPT = r"""
import sys, threading, hashlib
import numpy as np
sys.path.insert(0, {root!r})
import packers as P
from tests.test_packers_cpsat import _instance

if {load}:  # a busy thread changes wall-clock timing, never a deterministic budget
    stop = threading.Event()
    def spin():
        x = 0
        while not stop.is_set():
            x += 1
    threading.Thread(target=spin, daemon=True).start()
out = []
for n, m, pairs in ((60, 6, 6000), (400, 8, 500)):  # full model, then LNS
    times, bin_type, _, _ = _instance(11, n, m)
    greedy = P.lpt_makespan(times, bin_type)
    c = P.cpsat_makespan(times, bin_type, hint=greedy.bin_of, time_limit=0.0, deterministic_time=0.05,
                         seed=3, max_model_pairs=pairs)
    out.append(c.solver + ":" + hashlib.sha256(c.bin_of.tobytes()).hexdigest())
print("|".join(out))
"""


def test_deterministic_time_gives_the_same_answer_in_every_process():
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    runs = [
        subprocess.run([sys.executable, "-c", _REPRO_SCRIPT.format(root=root, load=load)], capture_output=True,
                       text=True, timeout=120, check=True, cwd=root).stdout.strip()
        for load in (False, True)
    ]
    assert runs[0] == runs[1], runs
    assert "cpsat-lns" in runs[0]


def test_deterministic_time_is_validated():
    import pytest

    times, bin_type, _, _ = _instance(1, 10, 2)
    with pytest.raises(ValueError, match="num_workers"):
        P.cpsat_makespan(times, bin_type, deterministic_time=0.1, num_workers=2)
    with pytest.raises(ValueError, match="deterministic_time"):
        P.cpsat_makespan(times, bin_type, deterministic_time=-1.0)


def test_planning_works_without_ortools_and_cpsat_says_how_to_get_it():
    """OR-tools is optional at import: a machine without it (the GPU box of the measured
    plans) plans with the greedy paths; only CP-SAT itself asks for the package."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ortools" or name.startswith("ortools."):
                    raise ImportError("No module named 'ortools'")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import balancer.selector, balancer.simulation
        from packers import cpsat_makespan, lpt_makespan
        assert lpt_makespan(np.ones((3, 1)), np.zeros(2, dtype=np.int64)).makespan > 0
        try:
            cpsat_makespan(np.ones((3, 1)), np.zeros(2, dtype=np.int64), time_limit=0.1)
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CP-SAT needs OR-tools, which is not installed" in out.stdout and "pip install ortools" in out.stdout
