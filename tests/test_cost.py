"""balancer.cost core: LayoutCost, replica time, explicit coefficients, Hydraulis files, JSON."""

import json

import numpy as np
import pytest

from balancer.cost import CostModel, LayoutCost, UnsupportedLayoutError, replica_seconds
from balancer.data import INSTANCES_FILE
from strategies import Layout


def test_layout_cost_validates_and_prices():
    cost = LayoutCost(a=1e-6, b=1e-3, c=0.01, token_capacity=4096)
    assert cost.seconds([1000, 2000]).tolist() == pytest.approx([2.0, 6.0])
    with pytest.raises(ValueError, match="a=-1.0 must be finite and >= 0"):
        LayoutCost(a=-1.0, b=0.0, c=0.0, token_capacity=1)
    with pytest.raises(ValueError, match="token_capacity=0 must be >= 1"):
        LayoutCost(a=0.0, b=0.0, c=0.0, token_capacity=0)


def test_per_sequence_term_prices_every_sequence():
    cost = LayoutCost(a=1e-6, b=1e-3, c=0.01, d=0.5, token_capacity=4096)
    assert cost.seconds([1000, 2000]).tolist() == pytest.approx([2.5, 6.5])
    assert cost.micro_batch_seconds([1000, 2000]) == pytest.approx(2.5 + 6.5 + 0.01)
    model = CostModel.from_coefficients({"tp1": (1e-6, 1e-3, 0.01, 4096, 0.5)})
    assert model.cost(Layout()) == cost
    # Σ over micro-batches of Σ (a·s² + b·s + d), plus v·c: two micro-batches, three sequences
    got = model.replica_seconds([np.array([1000]), np.array([500, 500])], Layout())
    assert got == pytest.approx(2.5 + 2 * (0.25e-6 * 1e6 + 0.5 + 0.5) + 0.02)
    with pytest.raises(ValueError, match="d=-0.1 must be finite and >= 0"):
        LayoutCost(a=0.0, b=0.0, c=0.0, d=-0.1, token_capacity=1)
    with pytest.raises(ValueError, match=r"has 3 values .* give \(a, b, c, token_capacity\)"):
        CostModel.from_coefficients({"tp1": (1.0, 2.0, 3.0)})
    with pytest.raises(ValueError, match=r"unknown keys \['e'\]"):
        LayoutCost.from_dict({"a": 0, "b": 0, "c": 0, "e": 1, "token_capacity": 1})


def test_version_1_json_still_loads_with_no_per_sequence_term(tmp_path):
    """A file written before the per-sequence term (version 1, no ``d``) loads with d = 0 and
    is written back as version 2."""
    old = {
        "version": 1, "source": "fit", "meta": {"time_unit": "s"},
        "layouts": {"tp1": {"a": 1e-9, "b": 1e-5, "c": 4e-3, "token_capacity": 8192}},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    model = CostModel.load(tmp_path / "old.json")
    assert model.cost(Layout()) == LayoutCost(a=1e-9, b=1e-5, c=4e-3, d=0.0, token_capacity=8192)
    new = model.to_dict()
    assert new["version"] == 2 and new["layouts"]["tp1"]["d"] == 0.0
    assert CostModel.from_dict(new).cost(Layout()) == model.cost(Layout())


def test_replica_seconds_formula():
    # Σ T + v·c + (pp−1)·max T, divided by speed
    assert replica_seconds([1.0, 3.0, 2.0], c=0.5, pp=4, speed=0.5) == pytest.approx((6 + 1.5 + 9) / 0.5)
    assert replica_seconds([], c=0.5, pp=4) == 0.0
    model = CostModel.from_coefficients({"tp1pp2": (1e-6, 1e-3, 0.01, 8192)})
    got = model.replica_seconds([np.array([1000]), np.array([500, 500])], Layout(pp=2))
    assert got == pytest.approx(2.0 + 1.0 + 0.5 + 0.02 + 2.0)


def test_table_model_supports_only_its_layouts():
    model = CostModel.from_coefficients({Layout(tp=2): {"a": 0, "b": 1e-3, "c": 0, "token_capacity": 10}})
    assert model.supports(Layout(tp=2)) and not model.supports(Layout(tp=4))
    assert "known layouts: tp2" in model.unsupported_reason(Layout(tp=4))
    assert model.unsupported_reason(Layout(tp=2)) is None
    with pytest.raises(UnsupportedLayoutError, match="no coefficients for layout tp4"):
        model.cost(Layout(tp=4))
    assert model.time_unit == "s"


def test_resolver_failures_are_cached():
    calls = []

    def resolver(layout: Layout) -> LayoutCost:
        calls.append(layout)
        if layout.tp > 2:
            raise UnsupportedLayoutError(f"{layout.name} does not fit")
        return LayoutCost(a=0.0, b=1.0 / layout.tp, c=0.0, token_capacity=100 * layout.tp)

    model = CostModel(resolver=resolver, source="custom")
    assert model.token_capacity(Layout(tp=2)) == 200 and model.token_capacity(Layout(tp=2)) == 200
    assert not model.supports(Layout(tp=4)) and not model.supports(Layout(tp=4))
    with pytest.raises(UnsupportedLayoutError, match="tp4 does not fit"):
        model.cost(Layout(tp=4))
    assert calls == [Layout(tp=2), Layout(tp=4)]


def test_plain_value_error_from_a_resolver_means_unsupported():
    def resolver(layout: Layout) -> LayoutCost:
        if layout.pp > 1:
            raise ValueError(f"layout {layout.name}: no pipeline parallelism here")
        return LayoutCost(a=0.0, b=1e-3, c=0.0, token_capacity=64)

    model = CostModel(resolver=resolver, source="custom")
    assert model.supports(Layout()) and not model.supports(Layout(pp=2))
    with pytest.raises(UnsupportedLayoutError, match="tp1pp2: no pipeline parallelism here"):
        model.cost(Layout(pp=2))


def test_hydraulis_instance_in_milliseconds():
    model = CostModel.from_hydraulis_instance()
    assert model.time_unit == "ms" and model.meta["origin"] == INSTANCES_FILE.name
    assert model.layouts == [Layout(tp=1), Layout(tp=2, pp=2), Layout(tp=4), Layout(tp=8)]
    tp8 = model.cost(Layout(tp=8))  # published 13B numbers, milliseconds
    assert (tp8.a, tp8.b, tp8.token_capacity) == (6.59233262e-07, 0.0666817542, 50176)
    seconds = CostModel.from_hydraulis_instance(INSTANCES_FILE, unit="s")
    assert seconds.time_unit == "s"
    assert seconds.cost(Layout(tp=8)).b == pytest.approx(tp8.b / 1000)
    assert seconds.cost(Layout(tp=8)).token_capacity == 50176


def test_hydraulis_instance_errors(tmp_path):
    with pytest.raises(ValueError, match="unit='us' must be 'ms'"):
        CostModel.from_hydraulis_instance(unit="us")
    with pytest.raises(ValueError, match="does not exist"):
        CostModel.from_hydraulis_instance(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    rep = {"tp": 2, "pp": 1, "a": 1e-6, "b": 0.1, "c": 5.0, "max_seqlen": 4096}
    bad.write_text(json.dumps({"replicas": [rep, {**rep, "b": 0.2}]}))
    with pytest.raises(ValueError, match="replica 1 gives tp2 coefficients"):
        CostModel.from_hydraulis_instance(bad)
    bad.write_text(json.dumps({"replicas": [{"tp": 2}]}))
    with pytest.raises(ValueError, match=r"replica 0 lacks \['a', 'b', 'c', 'max_seqlen', 'pp'\]"):
        CostModel.from_hydraulis_instance(bad)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CostModel.from_coefficients(
            {"tp1": (1e-8, 1e-4, 1e-3, 4096, 2e-4), "tp2cp2": (2e-9, 3e-5, 1e-3, 65536)}
        ),
        lambda: CostModel.from_hydraulis_instance(),
    ],
    ids=["coefficients", "hydraulis"],
)
def test_json_round_trip(build, tmp_path):
    model = build()
    path = tmp_path / "cost.json"
    model.save(path)
    again = CostModel.load(path)
    assert again.source == model.source and again.meta == model.meta
    assert all(again.cost(lay) == model.cost(lay) for lay in model.layouts)
    assert again.to_dict() == model.to_dict()


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CostModel.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CostModel.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="version 3 is not supported.*reads versions 1, 2"):
        CostModel.from_dict({"version": 3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "cost model JSON must be an object with 'layouts'"),
        ('{"layouts": [1]}', "'layouts' and 'meta' must be objects"),
        ('{"layouts": {"tp1": [1, 2, 3, 4]}}', "layout 'tp1': LayoutCost: expected an object"),
        ('{"layouts": {"tp1": {"a": "abc", "b": 0, "c": 0, "token_capacity": 8}}}', "layout 'tp1': LayoutCost: a='abc' must be a number"),
        ('{"layouts": {"tp1": {"a": 0, "b": 0, "c": 0, "token_capacity": 4096.9}}}', "token_capacity=4096.9 must be a whole number"),
        ('{"layouts": {"tp1": {"a": 0, "b": 0, "c": 0, "token_capacity": true}}}', "token_capacity=True must be a whole number"),
    ],
)
def test_cost_model_json_errors_name_the_field(tmp_path, text, message):
    (tmp_path / "cost.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        CostModel.load(tmp_path / "cost.json")


def test_token_capacity_is_never_rounded():
    with pytest.raises(ValueError, match="token_capacity=4096.9 must be a whole number"):
        CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, 4096.9)})
    assert LayoutCost(a=0, b=0, c=0, token_capacity=4096.0).token_capacity == 4096
    with pytest.raises(ValueError, match="b=None must be a number"):
        LayoutCost(a=0, b=None, c=0, token_capacity=8)  # type: ignore[arg-type]
