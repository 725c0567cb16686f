"""The README's "Use it" snippet, run verbatim on one and on two gloo processes.

The code block is read from README.md at test time, so the README and the library cannot
drift apart. What the snippet leaves to the reader is supplied around it: ``world``, a
plain ``torch.utils.data.Dataset`` of token lists behind ``old_loader`` (no lengths
given), a tiny randomly initialised Llama in DDP as ``ddp_model``, an optimizer, and a
``cost_model.json`` in the working directory. One epoch is one step here (the snippet's
``tokens_per_step=1 << 20`` exceeds this small dataset, and the loader says so); both
runs must end with the same parameters — the balanced split over two ranks gives the
gradient of the whole global batch.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from strategies.runtime import run_local  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 61


def use_it_snippet() -> str:
    """The first ```python block under the README's "## Use it" heading."""
    text = README.read_text()
    section = text.split("\n## Use it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README.md's 'Use it' section has no python code block"
    return block.group(1)


class TokenLists(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A plain map-style dataset: ``{"input_ids": tensor}`` of 3..60 tokens, no length column."""

    def __init__(self, n: int = 48) -> None:
        rng = np.random.default_rng(11)
        self.rows = [torch.from_numpy(rng.integers(0, VOCAB, size=int(k))) for k in rng.integers(3, 60, size=n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def _run_snippet(rank: int, world: int, workdir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from balancer.cost import CostModel

    os.chdir(workdir)
    if rank == 0 and not Path("cost_model.json").exists():
        CostModel.from_coefficients({"tp1": (1e-9, 1e-6, 1e-4, 96)}).save("cost_model.json")  # 96-token micro-batches
    dist.barrier()
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]  # type: ignore[method-assign]
    old_loader = torch.utils.data.DataLoader(TokenLists(), batch_size=4, shuffle=True)
    namespace = {"world": world, "old_loader": old_loader, "ddp_model": ddp_model, "optimizer": optimizer}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(use_it_snippet(), str(README), "exec"), namespace)  # noqa: S102 — the README, verbatim
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {"steps": len(steps), "params": params, "warnings": [str(w.message) for w in caught]}


# ~20 s: two launches (1 and 2 forked processes) that import transformers.
def test_readme_use_it_snippet_runs_and_is_exact_on_one_and_two_processes(tmp_path: Path) -> None:
    one = run_local(_run_snippet, 1, (str(tmp_path),), timeout_s=240, collective_timeout_s=60)
    two = run_local(_run_snippet, 2, (str(tmp_path),), timeout_s=240, collective_timeout_s=60)
    assert one[0]["steps"] == two[0]["steps"] == two[1]["steps"] == 1  # one optimizer step per epoch here
    assert any("of the" in w and "tokens of an epoch" in w for w in one[0]["warnings"])  # and the loader said so
    torch.manual_seed(0)
    initial = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).state_dict()
    for name, value in one[0]["params"].items():
        assert not np.array_equal(value, initial[name].numpy()) or "rotary" in name or name.endswith("inv_freq")
        np.testing.assert_allclose(two[0]["params"][name], value, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(two[1]["params"][name], two[0]["params"][name], err_msg=name)


def test_readme_demo_transcript_is_the_demos_summary() -> None:
    """The README's demo transcript is a real summary (its block once went empty unnoticed):
    every line the demo's summary prints, and the estimate the quick start quotes."""
    text = README.read_text()
    section = text.split("`hydraulis demo` runs the whole pipeline", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "README.md's demo paragraph has no transcript block"
    lines = block.group(1).strip().splitlines()
    starts = ("══ summary", "estimate, ", "measured, 2 CPU processes", "measured, multipack", "  wall clock",
              "same global batches")
    assert [line.startswith(s) for line, s in zip(lines, starts)] == [True] * len(starts) and len(lines) == len(starts)
    quick = (README.parent / "docs" / "quickstart.md").read_text()
    estimate = re.search(r"balancer ([\d,]+) tokens/s — ([\d.]+)× the best baseline", lines[1])
    assert estimate and f"balancer: {estimate.group(1)} tokens/s" in quick and f"{estimate.group(2)}× (over" in quick
