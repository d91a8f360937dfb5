"""`--plot` for the linear-layer micro-benchmarks here (bf16, int8, GGUF): a panel per M, a bar
per shape and kernel.

At M <= 4 a linear layer streams its weights, so the panel shows GB/s of weight bytes, under a
memory-bandwidth line when `--plot-ceiling` gives one (these scripts do not measure it;
benchmarks/bench_cpu_ops.py prints the machine's copy GB/s). Above, the panel shows GFLOP/s
(2 M K N / time), as bench_bf16_linear.py's cells do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

# plotting.py and machine_info.py live with the other benchmarks, in the repository's benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from plotting import Bars, Ceiling, add_plot_flag, check_plot_path, save

MAX_BANDWIDTH_M = 4  # at most this many rows of x: weight-streaming, plotted in GB/s


class Timing(NamedTuple):
    """One table row: a kernel on one shape at one M."""

    m: int
    shape: str
    kernel: str
    seconds: float
    weight_bytes: int
    flop: int  # 2 M K N

    @property
    def gbs(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    @property
    def gflops(self) -> float:
        return self.flop / self.seconds / 1e9


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_plot_flag(parser)
    parser.add_argument(
        "--plot-ceiling",
        type=float,
        default=None,
        metavar="GB/s",
        help="a memory bandwidth to draw on the GB/s panels (e.g. bench_cpu_ops.py's copy GB/s)",
    )


def check_flags(args: argparse.Namespace) -> None:
    """Before the run: a plot that cannot be drawn fails now, not after the measurements."""
    check_plot_path(args.plot)
    if args.plot_ceiling is not None and args.plot_ceiling <= 0:
        raise SystemExit(f"--plot-ceiling {args.plot_ceiling}: a bandwidth must be > 0 GB/s")


def plot(path: str, rows: Sequence[Timing], title: str, ceiling_gbs: float | None) -> None:
    """A panel per M, in the table's order; in each, the shapes along x and a bar per kernel."""
    panels = []
    for m in dict.fromkeys(r.m for r in rows):  # in the order the table has them
        at_m = [r for r in rows if r.m == m]
        shapes = list(dict.fromkeys(r.shape for r in at_m))
        kernels = list(dict.fromkeys(r.kernel for r in at_m))
        by_key = {(r.shape, r.kernel): r for r in at_m}
        bandwidth = m <= MAX_BANDWIDTH_M
        series = {
            k: [by_key[s, k].gbs if bandwidth else by_key[s, k].gflops for s in shapes]
            for k in kernels
        }
        ceiling = None
        if bandwidth and ceiling_gbs is not None:
            ceiling = Ceiling(ceiling_gbs, f"memory bandwidth {ceiling_gbs:.1f} GB/s")
        unit = "GB/s of weight bytes" if bandwidth else "GFLOP/s (2 M K N / time)"
        panels.append(Bars(shapes, series, unit, title=f"M = {m}", ceiling=ceiling))
    save(path, title, panels)
