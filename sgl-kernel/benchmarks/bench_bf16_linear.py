"""Micro-benchmark of sgl_kernel's packed bf16 linear op against torch's fp32 and bf16 ones.

    python sgl-kernel/benchmarks/bench_bf16_linear.py [--m 1 4 16 64 1024] [--threads 2]
    python sgl-kernel/benchmarks/bench_bf16_linear.py --plot bf16_linear.png --plot-ceiling 12

SmolLM2-135M's shapes. Weights are cold (cycled through copies larger than the L3 cache, so each
call reads them from memory) unless `--warm`. Columns: torch fp32 through oneDNN (what lmprog's
fp32 layers run), torch bf16 F.linear (oneDNN's bf16 matmul), and `bf16_linear` on this
process's path (LMPROG_BF16_DOT=0 for the AVX-512 path without BF16's dot product). Cells are
microseconds per call, with GB/s of weight bytes at M <= 4 and GFLOP/s above.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from linear_plot import Timing, add_flags, check_flags, plot
from sgl_kernel import detected_isa
from sgl_kernel.bf16 import bf16_linear, bf16_linear_path, bf16_pack

SHAPES = [
    (576, 960, "qkv"),
    (576, 576, "o"),
    (576, 3072, "gate_up"),
    (1536, 576, "down"),
    (576, 49152, "LM head"),
]
COLD_BYTES = 256 << 20


def median_time(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    for w in weights[:2]:
        fn(w)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < 0.4:
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        times.append((time.perf_counter() - t0) / len(weights))
    return sorted(times)[len(times) // 2]


def copies(t: torch.Tensor, warm: bool) -> list[torch.Tensor]:
    n = 1 if warm else max(1, -(-COLD_BYTES // (t.numel() * t.element_size())))
    return [t] + [t.clone() for _ in range(n - 1)]


def cell(seconds: float, m: int, k: int, n: int, weight_bytes: int) -> str:
    rate = (
        f"{weight_bytes / seconds / 1e9:.1f} GB/s"
        if m <= 4
        else f"{2 * m * k * n / seconds / 1e9:.0f} GF"
    )
    return f"{seconds * 1e6:.0f} ({rate})"


def measure(m: int, k: int, n: int, warm: bool) -> tuple[float, float, float]:
    """Seconds per call: fp32 through oneDNN, bf16 F.linear, bf16_linear."""
    w32 = torch.randn(n, k) / k**0.5
    x32 = torch.randn(m, k)
    xb = x32.bfloat16()
    fp32 = median_time(
        lambda w: torch.ops.mkldnn._linear_pointwise(x32, w, None, "none", [], ""),
        copies(w32, warm),
    )
    wb = copies(w32.bfloat16(), warm)
    torch_bf16 = median_time(lambda w: F.linear(xb, w), wb)
    kernel = median_time(lambda p: bf16_linear(xb, p, n), [bf16_pack(w) for w in wb])
    return fp32, torch_bf16, kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 1024])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warm", action="store_true")
    add_flags(ap)
    args = ap.parse_args()
    check_flags(args)
    torch.set_num_threads(args.threads)
    print(
        f"# CPU {detected_isa()}, bf16_linear path {bf16_linear_path()}, {args.threads} threads, "
        f"weights {'warm' if args.warm else 'cold'}; us per call"
    )
    print("| M | K x N | fp32 oneDNN | bf16 F.linear | bf16_linear | vs bf16 F.linear |")
    print("|---|---|---|---|---|---|")
    timings = []
    for m in args.m:
        for k, n, name in SHAPES:
            fp32, torch_bf16, kernel = measure(m, k, n, args.warm)
            shape, flop = f"{k} x {n} ({name})", 2 * m * k * n
            timings += [
                Timing(m, shape, "fp32 oneDNN", fp32, 4 * n * k, flop),
                Timing(m, shape, "bf16 F.linear", torch_bf16, 2 * n * k, flop),
                Timing(m, shape, f"bf16_linear ({bf16_linear_path()})", kernel, 2 * n * k, flop),
            ]
            print(
                f"| {m} | {k} x {n} ({name}) | {cell(fp32, m, k, n, 4 * n * k)} | "
                f"{cell(torch_bf16, m, k, n, 2 * n * k)} | {cell(kernel, m, k, n, 2 * n * k)} | "
                f"{torch_bf16 / kernel:.2f}x |"
            )
    if args.plot:
        title = (
            f"bf16 linear, SmolLM2-135M shapes: {args.threads} threads, "
            f"weights {'warm' if args.warm else 'cold'}"
        )
        plot(args.plot, timings, title, args.plot_ceiling)


if __name__ == "__main__":
    main()
