"""A thread count that does not collapse on a shared machine.

torch's default is one intra-op thread per core. On a machine other jobs already keep busy, those
threads wait on each other and a CPU fit slows down many times over (measured on 2 cores with four busy
processes beside the fit: 599 s with the default, 116 s with one thread; on the quiet machine 37 s against
43 s). So when the user has chosen nothing (no ``OMP_NUM_THREADS`` or ``MEMEFX_THREADS``) and the
one-minute load average already reaches the cores this process may use, memefx runs one thread and says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CHOSEN_BY_USER = ("MEMEFX_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def busy_machine_threads(env: Mapping[str, str], load: float, cores: int) -> int | None:
    """The thread count to use instead of torch's default, or None to keep it: ``MEMEFX_THREADS`` when set;
    1 when nothing was chosen and the load already reaches the cores; else None."""
    if env.get("MEMEFX_THREADS", "").strip():
        value = env["MEMEFX_THREADS"].strip()
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MEMEFX_THREADS={value!r}: expected a positive number of threads")
        return int(value)
    if any(env.get(name, "").strip() for name in CHOSEN_BY_USER):
        return None
    return 1 if load >= cores else None


def apply_thread_default() -> str | None:
    """Set torch's thread count by ``busy_machine_threads``; returns the line that says why, or None."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return None
    cores = usable_cores()
    threads = busy_machine_threads(os.environ, load, cores)
    if threads is None:
        return None
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("MEMEFX_THREADS", "").strip():
        return None
    return (f"memefx: the machine is busy (load {load:.1f} on {cores} cores): torch runs 1 thread, which is faster "
            "here; set OMP_NUM_THREADS (or MEMEFX_THREADS) to choose")
