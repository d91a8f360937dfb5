"""Where one stream's decode step goes: the kernels (linear layers, attention, norms) vs the rest.

    python benchmarks/bench_step_overhead.py [--quantization int8|gguf] [--steps 128]

One greedy stream through the offline engine (`LLM.generate`, ignore_eos). The step time is the
difference between generating `--steps` + 8 tokens and 8 tokens, divided by `--steps`, so the
prefill drops out. A second run under torch.profiler sums the self CPU time of the compute ops
(sgl_kernel's, oneDNN's and aten's matmuls and SDPA) per step; the overhead is the step time minus
that: Python, scheduling, sampling, small torch ops and their dispatch. The profiler's own cost
lands in the profiled run only, which is used for the kernel sum alone.

Two engines run side by side: decode steps through sgl_kernel's C++ DecodeStack (the default
where it applies) and through the Python modules (LMPROG_DECODE_STACK=0), timed interleaved.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

from machine_info import header

from lmprog import LLM, SamplingParams
from lmprog.runtime.layers.decode_stack import ENV
from lmprog.runtime.layers.kernels import cpu_path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
COMPUTE_PREFIXES = ("sgl_kernel::", "mkldnn::", "aten::mm", "aten::addmm", "aten::bmm")
COMPUTE_NAMES = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def timed(llm: LLM, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([PROMPT], params, use_tqdm=False)
    return time.perf_counter() - t0


def kernel_ms_per_step(llm: LLM, steps: int) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([PROMPT], params, use_tqdm=False)
    by_op: dict[str, float] = collections.Counter()
    for e in prof.key_averages():
        if e.key.startswith(COMPUTE_PREFIXES) or e.key in COMPUTE_NAMES:
            by_op[e.key] += e.self_cpu_time_total / 1000 / steps
    return sum(by_op.values()), dict(by_op)


def build(args: argparse.Namespace, stack: bool) -> LLM:
    """An engine whose decode steps run through the C++ DecodeStack or the modules (the stack is
    built on the first forward, reading LMPROG_DECODE_STACK then)."""
    os.environ[ENV] = "1" if stack else "0"
    llm = LLM(
        dtype=args.dtype,
        quantization=args.quantization,
        attention_backend=args.attention_backend,
        seed=0,
    )
    timed(llm, 16)  # warm, and build the stack
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()
    engines = {"DecodeStack": build(args, True), "modules": build(args, False)}
    # Interleaved, best of 3: a noisy neighbour slows both columns alike.
    short = {name: float("inf") for name in engines}
    full = dict(short)
    for _ in range(3):
        for name, llm in engines.items():
            short[name] = min(short[name], timed(llm, 8))
            full[name] = min(full[name], timed(llm, args.steps + 8))
    step = {name: (full[name] - short[name]) / args.steps * 1000 for name in engines}
    kernels = {name: kernel_ms_per_step(llm, args.steps) for name, llm in engines.items()}
    print(
        f"# {header()}; CPU path {cpu_path()}; dtype {args.dtype}; "
        f"quantization {args.quantization}; attention {args.attention_backend}"
    )
    names = list(engines)
    print(f"| decode step, 1 stream, ms | {' | '.join(names)} |\n|---|---|---|")
    print(f"| whole step | {' | '.join(f'{step[n]:.2f}' for n in names)} |")
    print(f"| compute ops (profiled) | {' | '.join(f'{kernels[n][0]:.2f}' for n in names)} |")
    overhead = [f"{step[n] - kernels[n][0]:.2f}" for n in names]
    print(f"| overhead (step - compute) | {' | '.join(overhead)} |")
    print(f"| tok/s | {' | '.join(f'{1000 / step[n]:.1f}' for n in names)} |")
    for name in names:
        print(f"\ncompute ops, ms per step ({name}):")
        for op, ms in sorted(kernels[name][1].items(), key=lambda kv: -kv[1]):
            print(f"  {op:55s} {ms:7.3f}")


if __name__ == "__main__":
    main()
