"""Parallel layouts, replicas, strategies and the cluster they run on.

A *layout* is the shape of one model replica: tensor (``tp``), context (``cp``) and
pipeline (``pp``) parallel degrees. A *replica* is a layout placed on concrete ranks. A
*strategy* is a list of replicas that covers every rank of the cluster exactly once;
replicas of one strategy may have different layouts (heterogeneous data parallelism,
e.g. one TP-4 replica for the long sequences and four TP-1 replicas for the short ones).

Rank order inside a replica is tp fastest, then cp, then pp::

    local = ranks.index(rank)
    tp_rank = local % tp;  cp_rank = (local // tp) % cp;  pp_rank = local // (tp * cp)

so a tp group is a run of consecutive ranks, which keeps it inside one node when the
replica starts on a node boundary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = ["Layout", "Replica", "Strategy", "ClusterSpec", "GIB", "whole_number"]

GIB = 1024**3

_LAYOUT_RE = re.compile(r"^tp(\d+)(?:cp(\d+))?(?:pp(\d+))?$")


def _check_positive_int(name: str, value: Any, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive integer (e.g. {name}=1)")


def whole_number(what: str, value: Any) -> int:
    """``value`` as an int if it is a whole number (``4`` or ``4.0``), else a ``ValueError`` naming ``what``.

    JSON readers use it so that ``2.7`` or ``"2"`` is refused instead of truncated.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True, order=True)
class Layout:
    """Parallel degrees of one model replica."""

    tp: int = 1
    """Tensor-parallel degree: attention heads and MLP columns split over ``tp`` ranks."""
    cp: int = 1
    """Context-parallel degree: each sequence's tokens split over ``cp`` ranks."""
    pp: int = 1
    """Pipeline-parallel degree: layers split into ``pp`` stages (1F1B schedule)."""

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp"):
            _check_positive_int(name, getattr(self, name), "Layout")

    @property
    def size(self) -> int:
        """Number of ranks (devices) one replica of this layout occupies."""
        return self.tp * self.cp * self.pp

    @property
    def name(self) -> str:
        """Short name: ``tp4``, ``tp2cp2``, ``tp2pp2``, ``tp1cp2pp4``."""
        out = f"tp{self.tp}"
        if self.cp > 1:
            out += f"cp{self.cp}"
        if self.pp > 1:
            out += f"pp{self.pp}"
        return out

    @classmethod
    def parse(cls, name: str) -> "Layout":
        """Inverse of :attr:`name` (``"tp2cp2"`` → ``Layout(tp=2, cp=2, pp=1)``)."""
        m = _LAYOUT_RE.match(name.strip())
        if not m:
            raise ValueError(f"cannot parse layout {name!r}: expected e.g. 'tp4', 'tp2cp2', 'tp1pp2'")
        tp, cp, pp = (int(g) if g else 1 for g in m.groups())
        return cls(tp=tp, cp=cp, pp=pp)

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "pp": self.pp}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layout":
        unknown = set(d) - {"tp", "cp", "pp"}
        if unknown:
            raise ValueError(f"Layout: unknown keys {sorted(unknown)}; expected tp, cp, pp")
        if not isinstance(d, dict):
            raise ValueError(f"Layout: expected an object with tp, cp, pp, got {type(d).__name__} {d!r}")
        return cls(**{k: whole_number(f"Layout {k}", d.get(k, 1)) for k in ("tp", "cp", "pp")})

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Replica:
    """One model replica: a layout on concrete global ranks (tp fastest, then cp, then pp)."""

    layout: Layout
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.layout, Layout):
            raise ValueError(f"Replica: layout must be a Layout, got {type(self.layout).__name__}")
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if len(self.ranks) != self.layout.size:
            raise ValueError(
                f"Replica {self.layout.name}: got {len(self.ranks)} ranks {list(self.ranks)}, "
                f"but tp*cp*pp = {self.layout.size}; pass exactly {self.layout.size} ranks"
            )
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"Replica {self.layout.name}: ranks {list(self.ranks)} contain duplicates")
        if min(self.ranks) < 0:
            raise ValueError(f"Replica {self.layout.name}: ranks {list(self.ranks)} must be >= 0")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, cp_rank, pp_rank)`` of a global rank inside this replica."""
        try:
            local = self.ranks.index(rank)
        except ValueError:
            raise ValueError(f"rank {rank} is not in replica {self.layout.name} {list(self.ranks)}") from None
        tp, cp = self.layout.tp, self.layout.cp
        return local % tp, (local // tp) % cp, local // (tp * cp)

    def rank_at(self, tp_rank: int, cp_rank: int = 0, pp_rank: int = 0) -> int:
        """Global rank at the given coordinates."""
        lay = self.layout
        if not (0 <= tp_rank < lay.tp and 0 <= cp_rank < lay.cp and 0 <= pp_rank < lay.pp):
            raise ValueError(f"coordinates ({tp_rank}, {cp_rank}, {pp_rank}) outside layout {lay.name}")
        return self.ranks[tp_rank + lay.tp * (cp_rank + lay.cp * pp_rank)]

    def tp_groups(self) -> list[tuple[int, ...]]:
        """Rank groups that share one tensor-parallel shard set (one per (cp, pp) coordinate)."""
        lay = self.layout
        return [
            tuple(self.rank_at(t, c, p) for t in range(lay.tp)) for p in range(lay.pp) for c in range(lay.cp)
        ]

    def cp_groups(self) -> list[tuple[int, ...]]:
        """Rank groups that split one sequence's tokens (one per (tp, pp) coordinate)."""
        lay = self.layout
        return [
            tuple(self.rank_at(t, c, p) for c in range(lay.cp)) for p in range(lay.pp) for t in range(lay.tp)
        ]

    def pp_groups(self) -> list[tuple[int, ...]]:
        """Rank groups that form one pipeline (one per (tp, cp) coordinate)."""
        lay = self.layout
        return [
            tuple(self.rank_at(t, c, p) for p in range(lay.pp)) for c in range(lay.cp) for t in range(lay.tp)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Replica":
        if not isinstance(d, dict) or "layout" not in d or "ranks" not in d:
            raise ValueError(f"Replica: expected an object with layout and ranks, got {d!r}")
        if not isinstance(d["ranks"], (list, tuple)):
            raise ValueError(f"Replica: ranks must be a list of integers, got {d['ranks']!r}")
        return cls(layout=Layout.from_dict(d["layout"]), ranks=tuple(whole_number("Replica rank", r) for r in d["ranks"]))


def _auto_name(replicas: Sequence[Replica]) -> str:
    """``tp4x1+tp1x4``: layouts in first-appearance order with their replica counts."""
    counts: dict[str, int] = {}
    for rep in replicas:
        counts[rep.layout.name] = counts.get(rep.layout.name, 0) + 1
    return "+".join(f"{name}x{n}" for name, n in counts.items())


@dataclass(frozen=True, slots=True)
class Strategy:
    """A set of replicas covering ranks ``0 .. num_ranks-1`` exactly once."""

    name: str
    replicas: tuple[Replica, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        if not self.replicas:
            raise ValueError(f"Strategy {self.name!r}: needs at least one replica")
        seen: dict[int, int] = {}
        for j, rep in enumerate(self.replicas):
            for r in rep.ranks:
                if r in seen:
                    raise ValueError(
                        f"Strategy {self.name!r}: rank {r} appears in replica {seen[r]} and replica {j}; "
                        "each rank must belong to exactly one replica"
                    )
                seen[r] = j
        n = len(seen)
        missing = sorted(set(range(n)) - set(seen))
        if missing:
            raise ValueError(
                f"Strategy {self.name!r}: ranks must be 0..{n - 1} with none missing; missing {missing[:8]}"
            )

    @property
    def num_ranks(self) -> int:
        return sum(rep.layout.size for rep in self.replicas)

    @property
    def layouts(self) -> list[Layout]:
        return [rep.layout for rep in self.replicas]

    @property
    def is_homogeneous(self) -> bool:
        return len({rep.layout for rep in self.replicas}) == 1

    def replica_index(self, rank: int) -> int:
        """Index of the replica that holds ``rank``."""
        for j, rep in enumerate(self.replicas):
            if rank in rep.ranks:
                return j
        raise ValueError(f"rank {rank} is not in strategy {self.name!r} (ranks 0..{self.num_ranks - 1})")

    @classmethod
    def homogeneous(cls, layout: Layout, num_ranks: int, name: str | None = None) -> "Strategy":
        """``num_ranks // layout.size`` identical replicas on consecutive ranks."""
        if num_ranks % layout.size:
            raise ValueError(
                f"layout {layout.name} uses {layout.size} ranks, which does not divide num_ranks={num_ranks}; "
                f"choose degrees whose product divides {num_ranks}"
            )
        return cls.from_counts([(layout, num_ranks // layout.size)], name=name)

    @classmethod
    def from_counts(cls, counts: Iterable[tuple[Layout, int]], name: str | None = None) -> "Strategy":
        """Place ``count`` replicas of each layout on consecutive ranks, largest replicas first.

        Largest-first placement keeps every power-of-two replica aligned to its own size,
        so a tp group never straddles a node boundary when ``ranks_per_node`` is a
        multiple of the tp degree.
        """
        items = [(lay, int(n)) for lay, n in counts if int(n) > 0]
        if not items:
            raise ValueError("Strategy.from_counts: no replicas (all counts are zero)")
        items.sort(key=lambda x: (-x[0].size, -x[0].tp, -x[0].cp, -x[0].pp))
        replicas: list[Replica] = []
        nxt = 0
        for lay, n in items:
            for _ in range(n):
                replicas.append(Replica(lay, tuple(range(nxt, nxt + lay.size))))
                nxt += lay.size
        return cls(name or _auto_name(replicas), tuple(replicas))

    def counts(self) -> dict[Layout, int]:
        """Number of replicas per layout."""
        out: dict[Layout, int] = {}
        for rep in self.replicas:
            out[rep.layout] = out.get(rep.layout, 0) + 1
        return out

    def check_cluster(self, cluster: "ClusterSpec") -> None:
        """Raise ``ValueError`` unless this strategy fits ``cluster`` (size; tp groups inside a node)."""
        if self.num_ranks != cluster.num_ranks:
            raise ValueError(
                f"strategy {self.name!r} covers {self.num_ranks} ranks but the cluster has "
                f"{cluster.num_ranks}; build the strategy for {cluster.num_ranks} ranks"
            )
        for rep in self.replicas:
            if rep.layout.tp > cluster.ranks_per_node:
                raise ValueError(
                    f"strategy {self.name!r}: tp={rep.layout.tp} exceeds ranks_per_node="
                    f"{cluster.ranks_per_node}; tensor parallelism must stay inside a node"
                )
            for group in rep.tp_groups():
                nodes = {cluster.node_of(r) for r in group}
                if len(nodes) > 1:
                    raise ValueError(
                        f"strategy {self.name!r}: tp group {list(group)} spans nodes {sorted(nodes)}; "
                        "place tp groups on consecutive ranks inside one node"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "replicas": [rep.to_dict() for rep in self.replicas]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Strategy":
        return cls(name=str(d["name"]), replicas=tuple(Replica.from_dict(r) for r in d["replicas"]))


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """The devices a job runs on. Bandwidths in bytes/s, memory in bytes."""

    num_ranks: int
    """Total number of ranks (one per device)."""
    ranks_per_node: int = 8
    """Devices per node; tensor-parallel groups must stay inside a node."""
    memory_bytes: int = 80 * GIB
    """Device memory per rank, bytes."""
    speed: tuple[float, ...] = field(default=())
    """Relative speed per rank (1.0 = nominal; 0.5 = takes twice as long). Empty → all 1.0."""
    intra_node_bandwidth: float = 300e9
    """Per-device bus bandwidth inside a node (NVLink-class), bytes/s."""
    inter_node_bandwidth: float = 25e9
    """Per-device bandwidth between nodes (e.g. 200 Gb/s InfiniBand), bytes/s."""

    def __post_init__(self) -> None:
        _check_positive_int("num_ranks", self.num_ranks, "ClusterSpec")
        _check_positive_int("ranks_per_node", self.ranks_per_node, "ClusterSpec")
        if self.num_ranks > self.ranks_per_node and self.num_ranks % self.ranks_per_node:
            raise ValueError(
                f"ClusterSpec: num_ranks={self.num_ranks} is not a multiple of ranks_per_node="
                f"{self.ranks_per_node}; use whole nodes (e.g. num_ranks="
                f"{(self.num_ranks // self.ranks_per_node + 1) * self.ranks_per_node})"
            )
        if self.memory_bytes <= 0:
            raise ValueError(f"ClusterSpec: memory_bytes={self.memory_bytes} must be > 0 (e.g. 80 * GIB)")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ClusterSpec: {name}={v!r} must be a positive number of bytes/s")
        speed = tuple(float(s) for s in self.speed) if self.speed else (1.0,) * self.num_ranks
        if len(speed) != self.num_ranks:
            raise ValueError(
                f"ClusterSpec: speed has {len(speed)} entries but num_ranks={self.num_ranks}; "
                "give one relative speed per rank or none"
            )
        for r, s in enumerate(speed):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"ClusterSpec: speed[{r}]={s} must be a finite number > 0 (1.0 = nominal)")
        object.__setattr__(self, "speed", speed)

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_ranks // self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def replica_speed(self, replica: Replica) -> float:
        """A replica runs at the pace of its slowest rank."""
        return min(self.speed[r] for r in replica.ranks)

    def with_speed(self, speed: Sequence[float]) -> "ClusterSpec":
        """A copy with new per-rank speeds."""
        return ClusterSpec(
            num_ranks=self.num_ranks,
            ranks_per_node=self.ranks_per_node,
            memory_bytes=self.memory_bytes,
            speed=tuple(speed),
            intra_node_bandwidth=self.intra_node_bandwidth,
            inter_node_bandwidth=self.inter_node_bandwidth,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_ranks": self.num_ranks,
            "ranks_per_node": self.ranks_per_node,
            "memory_bytes": self.memory_bytes,
            "speed": list(self.speed),
            "intra_node_bandwidth": self.intra_node_bandwidth,
            "inter_node_bandwidth": self.inter_node_bandwidth,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterSpec":
        known = {"num_ranks", "ranks_per_node", "memory_bytes", "speed", "intra_node_bandwidth", "inter_node_bandwidth"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ClusterSpec: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        kw = dict(d)
        if "speed" in kw:
            kw["speed"] = tuple(kw["speed"] or ())
        return cls(**kw)
