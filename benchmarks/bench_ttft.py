"""Time to first token of one long prompt: the `cpu` attention backend against `torch_native`.

    python benchmarks/bench_ttft.py [--prompt-tokens 1024] [--dtype auto] [--quantization int8]

One request of `--prompt-tokens` random token ids, `max_tokens=1`, the prefix cache off (every
run computes the whole prompt), through the offline engine; two engines in this process, timed
interleaved (best of `--repeats`). A torch profile of one prefill per engine splits the time into
linear layers, attention and the rest, which is what bounds the ratio: a prefill is mostly
matmuls, which both backends run the same way.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from machine_info import header

from lmprog import LLM, SamplingParams
from lmprog.runtime.layers.kernels import cpu_path

LINEAR = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "sgl_kernel::")
LINEAR_KERNELS = ("bf16_linear", "int8_linear", "gguf_linear")
ATTENTION = ("aten::_scaled_dot_product", "sgl_kernel::extend_attention", "aten::index_select")


def kind(op: str) -> str:
    if op.startswith("sgl_kernel::") and op.endswith(LINEAR_KERNELS):
        return "linear"
    if op.startswith(ATTENTION):
        return "attention (+ KV gather)"
    if op.startswith(LINEAR) and not op.startswith("sgl_kernel::"):
        return "linear"
    return "other ops"


def ttft(llm: LLM, ids: list[int]) -> float:
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1), False)
    return time.perf_counter() - t0


def split(llm: LLM, ids: list[int]) -> dict[str, float]:
    """Seconds of self CPU time per kind of op in one prefill."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ttft(llm, ids)
    out: dict[str, float] = collections.Counter()
    for e in prof.key_averages():
        out[kind(e.key)] += e.self_cpu_time_total / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engines = {
        backend: LLM(
            dtype=args.dtype,
            quantization=args.quantization,
            attention_backend=backend,
            disable_radix_cache=True,
            seed=0,
        )
        for backend in ("cpu", "torch_native")
    }
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.prompt_tokens,), generator=gen).tolist()
    best = {name: float("inf") for name in engines}
    for llm in engines.values():
        ttft(llm, ids[:64])  # warm
    for _ in range(args.repeats):
        for name, llm in engines.items():
            best[name] = min(best[name], ttft(llm, ids))
    splits = {name: split(llm, ids) for name, llm in engines.items()}
    dtype = next(iter(engines.values())).scheduler.model_runner.dtype
    print(
        f"# {header()}; CPU path {cpu_path()}; {args.prompt_tokens}-token prompt; dtype {dtype}; "
        f"quantization {args.quantization}"
    )
    kinds = ["linear", "attention (+ KV gather)", "other ops"]
    print(f"| attention backend | TTFT (s) | vs torch_native | {' | '.join(kinds)} (s) |")
    print("|---|---|---|---|---|---|")
    for name in engines:
        cells = " | ".join(f"{splits[name][k]:.2f}" for k in kinds)
        print(f"| {name} | {best[name]:.2f} | {best[name] / best['torch_native']:.2f}x | {cells} |")


if __name__ == "__main__":
    main()
