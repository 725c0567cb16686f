"""Run a function on N local CPU processes (gloo) — for tests, demos and debugging.

``run_local(fn, 4, args)`` starts 4 processes, initialises
``torch.distributed`` in each with gloo on CPU (CUDA hidden) and a collective timeout,
calls ``fn(rank, world_size, *args)`` and returns the ranks' return values. A rank that
raises makes ``run_local`` raise with every failing rank's traceback; ranks still running
after ``timeout_s`` are killed and reported, so a hang fails instead of blocking.

Processes come from a ``forkserver`` that has imported torch once (fork-safe: it never
ran a torch op, so no thread pool exists to break), so a run costs one fork per rank
instead of one interpreter start and torch import per rank. The server starts at the
first call and serves every later call of the process.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

__all__ = ["run_local", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: Sequence[Any],
           out_dir: str, collective_timeout_s: float, threads: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    result: tuple[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        result = ("ok", fn(rank, world_size, *args))
        # every rank done before any tears down: gloo aborts a process ("terminate called
        # without an active exception") when a peer destroys its group mid-exchange
        dist.barrier()
    except BaseException:  # noqa: BLE001 — report every failure to the parent
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return their results.

    ``fn`` must be importable (a module-level function). ``timeout_s`` bounds the whole run
    (seconds); ``collective_timeout_s`` bounds each collective inside it.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "strategies.runtime"])
    else:  # e.g. Windows: a fresh interpreter per rank
        ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hydraulis-run-") as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, fn, tuple(args), out_dir,
                                             collective_timeout_s, threads_per_rank), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        if hung:
            raise TimeoutError(f"ranks {hung} were still running after {timeout_s} s (a hang?); killed them")
        results: list[Any] = []
        errors: list[str] = []
        for r, p in enumerate(procs):
            path = Path(out_dir) / f"rank{r}.pkl"
            if not path.is_file():
                errors.append(f"rank {r} exited with code {p.exitcode} and left no result")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"rank {r} failed:\n{value}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
