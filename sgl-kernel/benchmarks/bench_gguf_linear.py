"""Micro-benchmark of sgl_kernel's GGUF linear op (Q4_1, Q8_0) against int8_linear and fp32.

    python sgl-kernel/benchmarks/bench_gguf_linear.py [--threads 2] [--warm] [--m 1 16 64]
    python sgl-kernel/benchmarks/bench_gguf_linear.py --plot gguf_linear.png --plot-ceiling 12

SmolLM2-135M's shapes (hidden 576, MLP 1536, vocabulary 49152) at M = 1 (one decode stream),
16 and 64 (a batch, or a short prefill). The kernels run the best path this process has; set
LMPROG_CPU_ISA=avx2 or scalar to time a lower one (the header says which ran). GB/s counts weight
bytes only (GGUF blocks with their scales, int8 with its scales, fp32): at M = 1 the weights are
what a decode step streams.

By default each op cycles through copies of its weights adding up to more than the L3 cache, so
weights come from memory as they do in a real decode step (the whole model does not fit in L3);
--warm reuses one copy. Times are medians; other processes on the machine add noise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8_linear import COLD_BYTES, copies, cpu_model, median_time
from linear_plot import Timing, add_flags, check_flags, plot

SHAPES = (  # (name, K, N)
    ("qkv 576x960", 576, 960),
    ("o 576x576", 576, 576),
    ("gate_up 576x3072", 576, 3072),
    ("down 1536x576", 1536, 576),
    ("lm_head 576x49152", 576, 49152),
)


def random_raw(n: int, k: int, qtype: int) -> torch.Tensor:
    """Random GGUF blocks [N, K / 32 * block bytes] with small finite scales (timing only)."""
    from sgl_kernel.gguf import BLOCK_BYTES, GGML_Q4_1

    blocks = torch.randint(0, 256, (n, k // 32, BLOCK_BYTES[qtype]), dtype=torch.uint8)
    heads = 2 if qtype == GGML_Q4_1 else 1  # d, and m for Q4_1
    scales = (torch.rand(n, k // 32, heads) * 0.01).to(torch.float16)
    blocks[..., : 2 * heads] = scales.view(torch.uint8)
    return blocks.reshape(n, -1)


def time_gguf(qtype: int, m: int, k: int, n: int, warm: bool) -> dict:
    from sgl_kernel.gguf import gguf_linear, gguf_pack

    packed = copies(gguf_pack(random_raw(n, k, qtype), qtype), warm)
    x = torch.randn(m, k)
    t = median_time(lambda p: gguf_linear(x, p, qtype, n, k), [(p,) for p in packed])
    return {"s": t, "bytes": packed[0].numel()}


def time_int8(m: int, k: int, n: int, warm: bool) -> dict:
    from sgl_kernel import quant

    qweight, scales = quant.quantize_int8_per_channel(torch.randn(n, k) / k**0.5)
    packed = copies(quant.int8_pack(qweight), warm)
    x = torch.randn(m, k)
    t = median_time(lambda p: quant.int8_linear(x, p, scales), [(p,) for p in packed])
    return {"s": t, "bytes": packed[0].numel() + scales.numel() * 4}


def time_fp32(m: int, k: int, n: int, warm: bool) -> dict:
    ws = copies(torch.randn(n, k), warm)
    x = torch.randn(m, k)
    t = median_time(lambda w: F.linear(x, w), [(w,) for w in ws])
    return {"s": t, "bytes": ws[0].numel() * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="rows of x")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warm", action="store_true", help="reuse one weight copy (cache-warm)")
    add_flags(ap)
    args = ap.parse_args()
    check_flags(args)
    torch.set_num_threads(args.threads)
    from sgl_kernel.gguf import GGML_Q4_1, GGML_Q8_0, gguf_linear_path
    from sgl_kernel.quant import int8_linear_path

    columns: dict[str, Callable[[int, int, int], dict]] = {
        "torch fp32 F.linear": lambda m, k, n: time_fp32(m, k, n, args.warm),
        f"int8 {int8_linear_path()}": lambda m, k, n: time_int8(m, k, n, args.warm),
        "gguf Q8_0": lambda m, k, n: time_gguf(GGML_Q8_0, m, k, n, args.warm),
        "gguf Q4_1": lambda m, k, n: time_gguf(GGML_Q4_1, m, k, n, args.warm),
    }
    print(
        f"# {cpu_model()}; torch {torch.__version__}; {args.threads} threads; "
        f"gguf path: {gguf_linear_path()} (LMPROG_CPU_ISA={os.environ.get('LMPROG_CPU_ISA', '')!r}); "
        f"weights {'warm' if args.warm else f'cold (cycled through > {COLD_BYTES >> 20} MB)'}"
    )
    print("# GB/s: weight bytes / time; GF: 2 M K N / time")
    print(
        f"| {'M':>3} | {'shape (K x N)':<18} | {'kernel':<19} | {'time':>12} | {'GB/s':>9} | {'GF':>9} |"
    )
    print(f"|{'-' * 5}|{'-' * 20}|{'-' * 21}|{'-' * 14}|{'-' * 11}|{'-' * 11}|")
    timings = []
    for m in args.m:
        for name, k, n in SHAPES:
            for label, fn in columns.items():
                t = fn(m, k, n)
                timings.append(Timing(m, name, label, t["s"], t["bytes"], 2 * m * k * n))
                print(
                    f"| {m:>3} | {name:<18} | {label:<19} | {t['s'] * 1e6:9.1f} us | "
                    f"{t['bytes'] / t['s'] / 1e9:9.1f} | {2 * m * k * n / t['s'] / 1e9:9.1f} |"
                )
            sys.stdout.flush()
    if args.plot:
        warm = "warm" if args.warm else "cold"
        title = f"GGUF linear, SmolLM2-135M shapes: {args.threads} threads, weights {warm}"
        plot(args.plot, timings, title, args.plot_ceiling)


if __name__ == "__main__":
    main()
