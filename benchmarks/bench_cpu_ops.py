"""sgl_kernel's CPU ops against their torch references, with achieved GB/s or GFLOP/s against
this machine's ceilings (a memory copy and an fp32 matmul, measured in the same run).

    python benchmarks/bench_cpu_ops.py
    LMPROG_CPU_ISA=avx2 python benchmarks/bench_cpu_ops.py     # a lower path
    python benchmarks/bench_cpu_ops.py --plot cpu_ops.png

Shapes are SmolLM2-135M's (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536), float32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import sgl_kernel
import torch
import torch.nn.functional as F
from machine_info import header
from plotting import Bars, Ceiling, add_plot_flag, check_plot_path, save

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 576, 9, 3, 64, 1536


def timed(fn: Callable[[], object], min_s: float = 0.3) -> float:
    """Median seconds per call over repeated batches of calls."""
    fn()
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    per = max((time.perf_counter() - t0) / n, 1e-7)
    reps = max(3, int(min_s / per / 5))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps)
    return sorted(samples)[2]


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, fp32 matmul GFLOP/s)."""
    a, b = torch.empty(64 << 20 >> 2), torch.empty(64 << 20 >> 2)
    copy = timed(lambda: b.copy_(a))
    m = torch.randn(1024, 1024)
    mm = timed(lambda: m @ m)
    return 2 * a.numel() * 4 / copy / 1e9, 2 * 1024**3 / mm / 1e9


def paged(batch: int, length: int, dtype: torch.dtype = torch.float32):
    slots = torch.randperm(batch * length) + 1
    k = torch.randn(batch * length + 1, KV_HEADS, HEAD_DIM, dtype=dtype)
    v = torch.randn_like(k)
    r2t = slots.view(batch, length).clone()
    return k, v, r2t, torch.arange(batch), torch.full((batch,), length)


def torch_decode(q, k, v, r2t, rows, lens) -> torch.Tensor:
    """torch_native's decode: gather each request's K/V from the pool, then SDPA."""
    idx = r2t[rows].view(-1)
    keys = k.index_select(0, idx).view(len(rows), -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    values = v.index_select(0, idx).view(len(rows), -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)


def norm_rows(n: int, copy_gbs: float) -> list[tuple]:
    x, w, r = torch.randn(n, HIDDEN), torch.randn(HIDDEN), torch.randn(n, HIDDEN)
    ref = timed(lambda: F.rms_norm(r + x, (HIDDEN,), w, 1e-6))
    ker = timed(lambda: sgl_kernel.fused_add_rmsnorm(x, r, w, 1e-6))
    b = 3 * x.numel() * 4
    rows = [(f"add + rmsnorm [{n}, {HIDDEN}]", ref, ker, b / ker / 1e9, "GB/s", copy_gbs)]
    g = torch.randn(n, 2 * MLP)
    ref = timed(lambda: F.silu(g[:, :MLP]) * g[:, MLP:])
    ker = timed(lambda: sgl_kernel.silu_and_mul(g))
    b = 3 * n * MLP * 4
    rows.append((f"silu_and_mul [{n}, {2 * MLP}]", ref, ker, b / ker / 1e9, "GB/s", copy_gbs))
    return rows


def decode_row(batch: int, length: int, copy_gbs: float) -> tuple:
    k, v, r2t, idx, lens = paged(batch, length)
    q = torch.randn(batch, HEADS, HEAD_DIM)
    o = torch.empty_like(q)
    ref = timed(lambda: torch_decode(q, k, v, r2t, idx, lens))
    ker = timed(lambda: sgl_kernel.decode_attention(q, k, v, o, r2t, idx, lens, 0.125))
    b = 2 * batch * length * KV_HEADS * HEAD_DIM * 4  # K and V read once
    return (f"decode attention B={batch} L={length}", ref, ker, b / ker / 1e9, "GB/s", copy_gbs)


def shared_prefix_rows(batch: int, prefix: int, own: int, flops: float) -> list[tuple]:
    """Few-shot decode: `batch` requests behind one shared `prefix` (the same slots, as the radix
    cache gives them), `own` tokens each; plain decode re-reads the prefix once per request."""
    k, v, r2t, idx, lens = paged(batch, prefix + own)
    r2t[:, :prefix] = r2t[0, :prefix]
    q = torch.randn(batch, HEADS, HEAD_DIM)
    o = torch.empty_like(q)
    group_of, prefix_lens = torch.zeros(batch, dtype=torch.int64), torch.tensor([prefix])
    ref = timed(lambda: torch_decode(q, k, v, r2t, idx, lens))
    dec = timed(lambda: sgl_kernel.decode_attention(q, k, v, o, r2t, idx, lens, 0.125))
    cas = timed(
        lambda: sgl_kernel.cascade_decode_attention(
            q, k, v, o, r2t, idx, lens, group_of, prefix_lens, 0.125
        )
    )
    work = 4 * batch * HEADS * HEAD_DIM * (prefix + own)  # QK^T and PV
    shape = f"B={batch} shared {prefix} + own {own}"
    return [
        (f"decode attention {shape}", ref, dec, work / dec / 1e9, "GFLOP/s", flops),
        (
            f"cascade decode attention {shape} ({dec / cas:.2f}x decode_attention)",
            ref,
            cas,
            work / cas / 1e9,
            "GFLOP/s",
            flops,
        ),
    ]


def extend_row(prefix: int, new: int, flops: float) -> tuple:
    k, v, r2t, idx, lens = paged(1, prefix + new)
    q = torch.randn(new, HEADS, HEAD_DIM)
    o = torch.empty_like(q)
    pre = torch.tensor([prefix])
    mask = torch.ones(new, prefix + new, dtype=torch.bool).tril(prefix)

    def ref_extend() -> torch.Tensor:  # torch_native: gather the row, then masked SDPA
        keys = k[r2t[0]].transpose(0, 1)[None]
        values = v[r2t[0]].transpose(0, 1)[None]
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True
        )

    ref = timed(ref_extend)
    ker = timed(lambda: sgl_kernel.extend_attention(q, k, v, o, r2t, idx, lens, pre, 0.125))
    work = 4 * HEADS * HEAD_DIM * new * (prefix + (new + 1) / 2)  # QK^T and PV, causal
    return (
        f"extend attention prefix={prefix} new={new}",
        ref,
        ker,
        work / ker / 1e9,
        "GFLOP/s",
        flops,
    )


def rows(copy_gbs: float, flops: float) -> list[tuple]:
    out = [row for n in (1, 64) for row in norm_rows(n, copy_gbs)]
    for batch, length in ((1, 1024), (1, 4096), (16, 512), (64, 200)):
        out.append(decode_row(batch, length, copy_gbs))
    out += shared_prefix_rows(64, 1024, 16, flops)
    for prefix, new in ((0, 1024), (1024, 64)):
        out.append(extend_row(prefix, new, flops))
    return out


def plot(path: str, table: list[tuple], copy_gbs: float, flops: float, title: str) -> None:
    """The kernel rate column, a panel per unit under its ceiling: memory-bound ops in GB/s
    against the copy, attention in GFLOP/s against the fp32 matmul."""
    panels = []
    for unit, ceiling, what in (("GB/s", copy_gbs, "copy"), ("GFLOP/s", flops, "fp32 matmul")):
        ops = [(name, rate) for name, _, _, rate, u, _ in table if u == unit]
        if ops:
            panels.append(
                Bars(
                    [name for name, _ in ops],
                    {"sgl_kernel": [rate for _, rate in ops]},
                    f"kernel rate ({unit})",
                    title=f"achieved {unit}",
                    ceiling=Ceiling(ceiling, f"{what} ceiling {ceiling:.1f} {unit}"),
                )
            )
    save(path, title, panels, ncols=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_plot_flag(parser)
    args = parser.parse_args()
    check_plot_path(args.plot)
    print(
        f"# bench_cpu_ops: {header()}, kernels on {sgl_kernel.cpu_isa()}, "
        f"{torch.get_num_threads()} torch threads"
    )
    copy_gbs, flops = ceilings()
    print(f"ceilings: copy {copy_gbs:.1f} GB/s (read + write), fp32 matmul {flops:.1f} GFLOP/s\n")
    print("| op | torch ms | kernel ms | speedup | kernel rate | of ceiling |")
    print("|---|---|---|---|---|---|")
    table = rows(copy_gbs, flops)
    for name, ref, ker, rate, unit, ceiling in table:
        print(
            f"| {name} | {ref * 1e3:.3f} | {ker * 1e3:.3f} | {ref / ker:.2f}x | "
            f"{rate:.1f} {unit} | {rate / ceiling:.0%} |"
        )
    if args.plot:
        title = (
            f"sgl_kernel CPU ops, kernels on {sgl_kernel.cpu_isa()}, "
            f"{torch.get_num_threads()} torch threads"
        )
        plot(args.plot, table, copy_gbs, flops, title)


if __name__ == "__main__":
    main()
