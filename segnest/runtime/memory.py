"""How much memory a process may still allocate: the bound sizes are checked against
before work that would otherwise die in an allocator with a traceback."""

from __future__ import annotations

import os


def available_bytes() -> int | None:
    """Memory available to new allocations without swapping (Linux ``MemAvailable``),
    else the physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
