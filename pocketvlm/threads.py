"""How many CPU threads an engine may be given: the one check `--threads` goes through on every command."""

from __future__ import annotations

import os

from .errors import PocketVLMError

THREADS_PER_CORE = 4  # more than this buys nothing and can exhaust the machine (10,642 threads were seen)


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity call
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int | None:
    """A thread count every engine can be given: 1 .. 4 x this machine's cores (None: the engine's choice)."""
    if threads is None:
        return None
    limit = THREADS_PER_CORE * cpu_count()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise PocketVLMError(f"--threads {threads}: give 1 to {limit} ({THREADS_PER_CORE} x the {cpu_count()} "
                             f"cores here)")
    return threads
