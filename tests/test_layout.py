"""strategies.layout: validation, coordinates, JSON round-trips."""

import pytest

from strategies import ClusterSpec, Layout, Replica, Strategy


def test_layout_name_roundtrip():
    for lay in [Layout(), Layout(4), Layout(2, 2), Layout(1, 2, 4), Layout(2, 1, 2)]:
        assert Layout.parse(lay.name) == lay
        assert Layout.from_dict(lay.to_dict()) == lay
    assert Layout(2, 2, 2).size == 8


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_layout_rejects_bad_degrees(bad):
    with pytest.raises(ValueError, match="positive integer"):
        Layout(tp=bad)


def test_layout_parse_error_names_value():
    with pytest.raises(ValueError, match="'tp2x'"):
        Layout.parse("tp2x")


def test_replica_coordinates_tp_fastest():
    rep = Replica(Layout(2, 2, 2), tuple(range(8, 16)))
    assert rep.coords(8) == (0, 0, 0)
    assert rep.coords(9) == (1, 0, 0)
    assert rep.coords(10) == (0, 1, 0)
    assert rep.coords(12) == (0, 0, 1)
    for r in rep.ranks:
        assert rep.rank_at(*rep.coords(r)) == r
    assert rep.tp_groups()[0] == (8, 9)
    assert rep.cp_groups()[0] == (8, 10)
    assert rep.pp_groups()[0] == (8, 12)
    # groups of each kind partition the replica
    for groups in (rep.tp_groups(), rep.cp_groups(), rep.pp_groups()):
        assert sorted(r for g in groups for r in g) == list(rep.ranks)


def test_replica_rank_count_must_match():
    with pytest.raises(ValueError, match="exactly 4 ranks"):
        Replica(Layout(4), (0, 1, 2))
    with pytest.raises(ValueError, match="duplicates"):
        Replica(Layout(2), (1, 1))


def test_strategy_covers_ranks_exactly_once():
    s = Strategy.from_counts([(Layout(1), 4), (Layout(4), 1)])
    assert s.name == "tp4x1+tp1x4"
    assert s.num_ranks == 8
    assert s.replicas[0].ranks == (0, 1, 2, 3)
    assert [s.replica_index(r) for r in range(8)] == [0, 0, 0, 0, 1, 2, 3, 4]
    assert Strategy.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="rank 1 appears in replica 0 and replica 1"):
        Strategy("x", (Replica(Layout(2), (0, 1)), Replica(Layout(2), (1, 2))))
    with pytest.raises(ValueError, match="missing"):
        Strategy("x", (Replica(Layout(2), (0, 1)), Replica(Layout(1), (3,))))
    with pytest.raises(ValueError, match="does not divide"):
        Strategy.homogeneous(Layout(3), 8)


def test_strategy_checks_cluster():
    cluster = ClusterSpec(num_ranks=16, ranks_per_node=8)
    Strategy.homogeneous(Layout(8), 16).check_cluster(cluster)
    with pytest.raises(ValueError, match="covers 8 ranks but the cluster has 16"):
        Strategy.homogeneous(Layout(8), 8).check_cluster(cluster)
    with pytest.raises(ValueError, match="inside a node"):
        Strategy.homogeneous(Layout(16), 16).check_cluster(cluster)
    odd = Strategy("odd", tuple([Replica(Layout(1), (0,))] + [Replica(Layout(8), tuple(range(1, 9)))]
                               + [Replica(Layout(1), (r,)) for r in range(9, 16)]))
    with pytest.raises(ValueError, match="spans nodes"):
        odd.check_cluster(cluster)


def test_cluster_validation():
    c = ClusterSpec(num_ranks=4, ranks_per_node=4)
    assert c.speed == (1.0,) * 4
    assert ClusterSpec.from_dict(c.to_dict()) == c
    assert c.with_speed([1, 0.5, 1, 1]).replica_speed(Replica(Layout(2), (0, 1))) == 0.5
    with pytest.raises(ValueError, match="multiple of ranks_per_node"):
        ClusterSpec(num_ranks=12, ranks_per_node=8)
    with pytest.raises(ValueError, match="speed has 2 entries"):
        ClusterSpec(num_ranks=4, speed=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"speed\[1\]=0.0"):
        ClusterSpec(num_ranks=2, speed=(1.0, 0.0))
    with pytest.raises(ValueError, match="unknown keys"):
        ClusterSpec.from_dict({"num_ranks": 2, "gpus": 3})


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tp": 2.7}, "Layout tp must be a whole number, got 2.7"),
        ({"cp": "2"}, "Layout cp must be a whole number, got '2'"),
        ({"pp": True}, "Layout pp must be a whole number, got True"),
    ],
)
def test_layout_json_is_read_strictly(bad, message):
    with pytest.raises(ValueError, match=message):
        Layout.from_dict(bad)
    assert Layout.from_dict({"tp": 2.0, "cp": 1}) == Layout(2)


def test_replica_json_refuses_fractional_ranks():
    with pytest.raises(ValueError, match="Replica rank must be a whole number, got 1.5"):
        Replica.from_dict({"layout": {"tp": 2}, "ranks": [0, 1.5]})
