"""strategies.runtime.state on one process: the owner map (units, chunks, padding) and its DCP-compatible cut."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.runtime import GPT, ModelConfig, ShardLayout, tp_shard, unit_name

shapes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(shapes, st.integers(1, 8))
def test_chunks_of_all_ranks_partition_every_parameter(shapes, world):
    params = [(f"layers.{i % 2}.w{i}", shape, None) for i, shape in enumerate(shapes)]
    layouts = [ShardLayout.build(params, world, r) for r in range(world)]
    for j, (name, shape, _) in enumerate(params):
        numel = math.prod(shape)
        slots = [lay.slots[j] for lay in layouts]
        assert {s.chunk for s in slots} == {math.ceil(numel / world)}
        assert sum(s.local_numel for s in slots) == numel
        # the same cut as DTensor's Shard(0) of the flat parameter (torch.chunk), which DCP reshards by
        want = [c.numel() for c in torch.arange(numel).chunk(world)] + [0] * world
        assert [s.local_numel for s in slots] == want[:world]
    for lay in layouts:  # segments: the chunks of a unit back to back, the same size on every rank
        assert lay.segment == layouts[0].segment
        for u in range(len(lay.units)):
            slots = lay.unit_slots(u)
            assert [s.offset for s in slots] == [sum(x.chunk for x in slots[:i]) for i in range(len(slots))]
            assert sum(s.chunk for s in slots) == lay.segment[u]


def test_units_are_layers_and_the_other_parameters():
    model = GPT(ModelConfig(vocab_size=16, hidden_size=8, num_layers=3, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=8))
    splits = model.tp_split_dims()
    layout = ShardLayout.build([(n, tuple(p.shape), splits[n]) for n, p in model.named_parameters()], 4, 1)
    assert layout.units == ("embed", "final_norm", "lm_head", "layers.0", "layers.1", "layers.2")  # module order
    assert unit_name("layers.12.w_up") == "layers.12" and unit_name("lm_head") == "lm_head"
    assert layout.num_parameters == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="rank 4 outside a world of 4 ranks"):
        ShardLayout.build([("w", (2, 2), None)], 4, 4)


def test_tp_shard_cuts_the_split_dim_and_keeps_replicated_parameters():
    w = torch.arange(24.0).view(4, 6)
    torch.testing.assert_close(tp_shard(w, 0, 2, 1), w[2:])
    torch.testing.assert_close(tp_shard(w, 1, 3, 2), w[:, 4:])
    assert tp_shard(w, None, 2, 1) is w
