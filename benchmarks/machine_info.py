"""What a benchmark header says about the machine: the CPU's best vector ISA and the cores.

Machines of one kind differ (AVX2 only, AVX-512, AVX-512 with AMX), and numbers from different
ones do not compare; every table says which it was measured on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_isa() -> str:
    """amx, avx512 or avx2 (what /proc/cpuinfo reports), else the machine name."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return platform.machine()
    for isa, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            extras = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
            return isa + (f" ({', '.join(extras)})" if extras else "")
    return platform.machine()


def header() -> str:
    return f"CPU {cpu_isa()}, {len(os.sched_getaffinity(0))} cores"
