"""The collective timeout of a torch.distributed process group, read the one way torch allows.

Every process group the project creates (the loader's plan-exchange group, the runtime's
per-strategy groups) takes the job's own timeout — what ``init_process_group(timeout=...)``
set on the default group — unless one is given explicitly, so a rank that fails or stops
is noticed within the limit the job chose, not torch's 30-minute default for new groups.
torch is imported inside the function: ``import strategies`` stays free of it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

__all__ = ["group_timeout"]


def group_timeout(group: Any = None) -> timedelta | None:
    """Collective timeout of ``group`` (default: the default group), or ``None`` when unreadable.

    ``None`` also when torch.distributed is not initialised.
    """
    import torch
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            # No public accessor in torch 2.x: the backend's options carry the group's timeout.
            timeout = group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - no backend for this device, or another torch version
            continue
        if isinstance(timeout, timedelta):
            return timeout
    return None
