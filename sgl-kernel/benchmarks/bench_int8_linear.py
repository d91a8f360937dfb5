"""Micro-benchmark of sgl_kernel's int8 linear op against torch's fp32 and bf16 linear layers.

    python sgl-kernel/benchmarks/bench_int8_linear.py [--threads 2] [--warm]
    python sgl-kernel/benchmarks/bench_int8_linear.py --plot int8_linear.png --plot-ceiling 12

SmolLM2-135M's shapes (hidden 576, MLP 1536, vocabulary 49152) at M = 1 (one decode stream)
and M = 64 (a batch, or a short prefill). Every kernel path the CPU has is timed: the best in
this process, the lower ones in subprocesses with LMPROG_CPU_ISA set (the path is fixed per
process). GB/s counts weight bytes only: at M = 1 the weights are what a decode step streams.

By default each op cycles through copies of its weights adding up to more than the L3 cache, so
weights come from memory as they do in a real decode step (the whole model does not fit in L3);
--warm reuses one copy. Times are medians; other processes on the machine add noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from linear_plot import Timing, add_flags, check_flags, plot

QUANT_PY = Path(__file__).resolve().parents[1] / "python" / "sgl_kernel" / "quant.py"
SHAPES = (  # (name, K, N)
    ("qkv/o 576x576", 576, 576),
    ("gate_up 576x3072", 576, 3072),
    ("down 1536x576", 1536, 576),
    ("lm_head 576x49152", 576, 49152),
)
COLD_BYTES = 128 << 20  # more than this machine kind's L3 (36 MB)
LOWER_PATHS = {"avx512_vnni": ("avx2", "scalar"), "avx2": ("scalar",), "scalar": ()}


def load_quant(dev_lib: str | None) -> ModuleType:
    """sgl_kernel.quant from the installed package, or from a JIT-built library (--dev-lib)."""
    if dev_lib:
        torch.ops.load_library(dev_lib)
        spec = importlib.util.spec_from_file_location("sgl_kernel_quant_dev", QUANT_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from sgl_kernel import quant

    return quant


def median_time(fn: Callable[..., object], args: list[tuple], min_s: float = 0.4) -> float:
    """Seconds per call: the median over rounds, one round calling fn once per argument tuple."""
    for a in args[:2]:
        fn(*a)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        for a in args:
            fn(*a)
        times.append((time.perf_counter() - t0) / len(args))
    return sorted(times)[len(times) // 2]


def copies(t: torch.Tensor, warm: bool) -> list[torch.Tensor]:
    n = 1 if warm else max(1, -(-COLD_BYTES // (t.numel() * t.element_size())))
    return [t] + [t.clone() for _ in range(n - 1)]


def time_int8(quant: ModuleType, m: int, k: int, n: int, warm: bool) -> dict:
    w = torch.randn(n, k) / k**0.5
    qweight, scales = quant.quantize_int8_per_channel(w)
    x = torch.randn(m, k)
    packed = copies(quant.int8_pack(qweight), warm)
    t = median_time(lambda p: quant.int8_linear(x, p, scales), [(p,) for p in packed])
    return {"s": t, "bytes": packed[0].numel() + scales.numel() * 4}


def time_torch(m: int, k: int, n: int, dtype: torch.dtype, onednn: bool, warm: bool) -> dict:
    ws = copies(torch.randn(n, k).to(dtype), warm)
    x = torch.randn(m, k).to(dtype)
    if onednn:  # what lmprog's fast_linear runs for fp32 (layers/linear.py)

        def fn(w: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:

        def fn(w: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w)

    return {"s": median_time(fn, [(w,) for w in ws]), "bytes": ws[0].numel() * ws[0].element_size()}


def int8_rows(quant: ModuleType, ms: list[int], warm: bool) -> dict[str, dict]:
    """{f"{m},{shape}": timing} for this process's int8 path."""
    return {f"{m},{name}": time_int8(quant, m, k, n, warm) for m in ms for name, k, n in SHAPES}


def lower_path_rows(path: str, isa: str, args: argparse.Namespace) -> dict[str, dict]:
    cmd = [sys.executable, __file__, "--int8-only", "--threads", str(args.threads)]
    cmd += ["--m", *map(str, args.m)] + (["--warm"] if args.warm else [])
    cmd += ["--dev-lib", args.dev_lib] if args.dev_lib else []
    env = {**os.environ, "LMPROG_CPU_ISA": isa}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["path"] == path, f"LMPROG_CPU_ISA={isa} ran {report['path']}, not {path}"
    return report["rows"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 64], help="rows of x")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warm", action="store_true", help="reuse one weight copy (cache-warm)")
    ap.add_argument("--dev-lib", help="a JIT-built library with the int8 ops, not sgl_kernel")
    ap.add_argument("--int8-only", action="store_true", help=argparse.SUPPRESS)
    add_flags(ap)
    args = ap.parse_args()
    check_flags(args)
    torch.set_num_threads(args.threads)
    quant = load_quant(args.dev_lib)
    path = quant.int8_linear_path()
    if args.int8_only:
        print(json.dumps({"path": path, "rows": int8_rows(quant, args.m, args.warm)}))
        return

    columns: dict[str, Callable[[int, int, int], dict]] = {
        "torch fp32 F.linear": lambda m, k, n: time_torch(m, k, n, torch.float32, False, args.warm),
        "torch fp32 oneDNN": lambda m, k, n: time_torch(m, k, n, torch.float32, True, args.warm),
        "torch bf16 F.linear": lambda m, k, n: time_torch(
            m, k, n, torch.bfloat16, False, args.warm
        ),
    }
    int8 = {path: int8_rows(quant, args.m, args.warm)}
    for lower in LOWER_PATHS[path]:
        int8[lower] = lower_path_rows(lower, lower.split("_")[0], args)

    print(
        f"# {cpu_model()}; torch {torch.__version__}; {args.threads} threads; "
        f"int8 path: {path} (LMPROG_CPU_ISA={os.environ.get('LMPROG_CPU_ISA', '')!r}); "
        f"weights {'warm' if args.warm else 'cold (cycled through > L3)'}"
    )
    print("# GB/s: weight bytes / time; GF: 2 M K N / time")
    print(
        f"| {'M':>3} | {'shape (K x N)':<18} | {'kernel':<19} | {'time':>12} | {'GB/s':>9} | {'GF':>9} |"
    )
    print(f"|{'-' * 5}|{'-' * 20}|{'-' * 21}|{'-' * 14}|{'-' * 11}|{'-' * 11}|")
    timings = []
    for m in args.m:
        for name, k, n in SHAPES:
            rows = [(label, fn(m, k, n)) for label, fn in columns.items()]
            rows += [(f"int8 {p}", r[f"{m},{name}"]) for p, r in int8.items()]
            for label, t in rows:
                timings.append(Timing(m, name, label, t["s"], t["bytes"], 2 * m * k * n))
                print(
                    f"| {m:>3} | {name:<18} | {label:<19} | {t['s'] * 1e6:9.1f} us | "
                    f"{t['bytes'] / t['s'] / 1e9:9.1f} | {2 * m * k * n / t['s'] / 1e9:9.1f} |"
                )
            sys.stdout.flush()
    if args.plot:
        warm = "warm" if args.warm else "cold"
        title = f"int8 linear, SmolLM2-135M shapes: {args.threads} threads, weights {warm}"
        plot(args.plot, timings, title, args.plot_ceiling)


if __name__ == "__main__":
    main()
