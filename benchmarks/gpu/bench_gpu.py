"""Issue 14's GPU benchmarks on random-weight models of real shapes (bf16, load_format="dummy").

    python benchmarks/gpu/bench_gpu.py --shape 8b --parts ceilings,decode,offline,attention,hf

Parts (each prints its rows; all rows also go to --json):
  ceilings   device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate
  decode     one stream: 32-token prompt, 256 output tokens, against the decode roofline (weights
             plus the KV read once per step at the measured copy bandwidth)
  offline    256 prompts x 512 in / 256 out, against a roofline (prefill FLOPs at the measured
             matmul rate plus every decode step's weight + KV bytes at the copy bandwidth)
  attention  decode attention alone at batch 64, context 1024, 32/8 heads, head_dim 128:
             FlashInfer's raw wrapper against lmprog's flashinfer and triton backends
  hf         HF transformers' generate on the same shape (random init) for the same two
             workloads: the baseline of the speedup targets

Every ratio is against a figure measured in the same process, and the GPU is named in the header.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: machine_info

# Llama-3.1-8B and Llama-3.2-1B (rope scaling left out: it does not change the speed).
SHAPES = {
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
}
ROWS: list[dict] = []


def report(part: str, name: str, value: float, unit: str, **extra: float | str) -> None:
    ROWS.append({"part": part, "name": name, "value": value, "unit": unit, **extra})
    more = "  ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
    )
    print(f"{part:<10} {name:<34} {value:>12.4g} {unit:<10} {more}", flush=True)


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per call of `fn`, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_time(lambda: dst.copy_(src), iters=10)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / cuda_time(lambda: a @ b, iters=10)


def ceilings() -> tuple[float, float]:
    copy_bw, flops = copy_bandwidth(), matmul_rate()
    report("ceilings", "copy bandwidth (read + write)", copy_bw / 1e12, "TB/s")
    report("ceilings", "bf16 matmul 8192^3", flops / 1e12, "TFLOP/s")
    return copy_bw, flops


def model_folder(shape: str) -> str:
    from transformers import LlamaConfig

    from lmprog.runtime.model_loader.dummy_folder import write_dummy_model_folder

    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    return str(write_dummy_model_folder(Path(tempfile.mkdtemp()) / f"llama-{shape}", config))


class Roofline:
    """Bytes and FLOPs of the shape: what a step must read, what a prefill must compute."""

    def __init__(self, model: torch.nn.Module, config, copy_bw: float, flops: float) -> None:
        nbytes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        embed = sum(v for n, v in nbytes.items() if "embed_tokens" in n)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        # A step reads every weight once; an untied embedding only for its B rows.
        self.weight_bytes = sum(nbytes.values()) - (0 if tied else embed)
        # Prefill FLOPs: the layers' matmuls for every token, the LM head for one per prompt.
        self.layer_params = sum(p.numel() for n, p in model.named_parameters() if "layers." in n)
        self.head_params = config.vocab_size * config.hidden_size
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.kv_bytes = config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * 2
        self.attn_flops_per_pair = (
            4 * config.num_hidden_layers * config.num_attention_heads * head_dim
        )
        self.copy_bw, self.flops = copy_bw, flops

    def step_seconds(self, context_tokens: int) -> float:
        return (self.weight_bytes + context_tokens * self.kv_bytes) / self.copy_bw

    def prefill_seconds(self, prompts: int, length: int) -> float:
        linear = 2 * (self.layer_params * prompts * length + self.head_params * prompts)
        attention = self.attn_flops_per_pair * prompts * length * (length + 1) / 2
        return (linear + attention) / self.flops


def bench_engine(args, copy_bw: float, flops: float) -> None:
    from lmprog import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model_folder(args.shape), load_format="dummy", device="cuda", max_model_len=4096,
        max_running_requests=256, cuda_graph_max_bs=256, seed=0,
        disable_cuda_graph=args.disable_cuda_graph, attention_backend=args.attention_backend,
    )  # fmt: skip
    runner = llm.scheduler.model_runner
    report("engine", "start (dummy weights, graphs)", time.perf_counter() - t0, "s",
           backend=runner.attention_backend, graphs=str(runner.graph_runner is not None))  # fmt: skip
    roof = Roofline(runner.model, runner.config, copy_bw, flops)
    gen = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(3, runner.vocab_size, (n, length), generator=gen).tolist()

    def timed(batch: list[list[int]], out: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t

    timed(prompts(4, 64), 8)  # warm: compiles, first-use allocations
    if "decode" in args.parts:
        out = 256
        seconds = timed(prompts(1, 32), out)
        roof_tps = 1 / roof.step_seconds(32 + out // 2)
        report("decode", f"{args.shape} bs1 decode", out / seconds, "tok/s",
               roofline=roof_tps, of_roofline=out / seconds / roof_tps)  # fmt: skip
    if "offline" in args.parts:
        n, inp, out = args.num_prompts, 512, 256
        seconds = timed(prompts(n, inp), out)
        ideal = roof.prefill_seconds(n, inp) + sum(
            roof.step_seconds(n * (inp + s)) for s in range(out)
        )
        report("offline", f"{args.shape} {n}x in{inp}/out{out}", n * out / seconds, "out tok/s",
               roofline=n * out / ideal, of_roofline=ideal / seconds)  # fmt: skip


def bench_hf(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[args.shape])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def timed(n: int, length: int, out: int) -> float:
        ids = torch.randint(3, config.vocab_size, (n, length), generator=gen).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=out,
                       min_new_tokens=out, do_sample=False, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2, 16, 4)
    report("hf", f"{args.shape} bs1 decode", 64 / timed(1, 32, 64), "tok/s")
    n = args.num_prompts
    report("hf", f"{args.shape} {n}x in512/out256", n * 256 / timed(n, 512, 256), "out tok/s")


def bench_attention() -> None:
    from lmprog.runtime.layers.attention import create_attention_backend
    from lmprog.runtime.layers.attention.base import RadixAttention
    from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool
    from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

    bs, ctx, heads, kv_heads, d, dt, dev = (
        64,
        1024,
        32,
        8,
        128,
        torch.bfloat16,
        torch.device("cuda"),
    )
    rows = ReqToTokenPool(bs, ctx, dev)
    pool = TokenToKVPool(bs * ctx, 1, 1, kv_heads, d, dt, dev)
    slots = torch.randperm(bs * ctx) + 1  # shuffled: pages are not contiguous in a real pool
    rows.write_runs(list(range(bs)), [0] * bs, [ctx] * bs, slots)
    k_buf, v_buf = pool.get_kv_buffer(0)
    k_buf.normal_(), v_buf.normal_()
    q = torch.randn(bs, heads, d, dtype=dt, device=dev)
    fb = ForwardBatch.build(
        ForwardMode.DECODE, [0] * bs, list(range(bs)), [ctx - 1] * bs, [1] * bs,
        slots.view(bs, ctx)[:, -1], dev, req_to_token_pool=rows, token_to_kv_pool=pool,
    )  # fmt: skip
    layer = RadixAttention(0, heads, d, kv_heads)
    kv_bytes = 2 * bs * ctx * kv_heads * d * 2
    times = {}
    for name in ("flashinfer", "triton"):
        try:
            backend = create_attention_backend(
                name, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, dtype=dt, device=dev
            )
        except ValueError as e:
            print(f"attention  {name}: skipped ({e})")
            continue
        fb.attn_backend = backend
        plan = cuda_time(lambda b=backend: b.init_forward_metadata(fb), iters=20)
        times[name] = cuda_time(lambda b=backend: b.forward_decode(q, q, q, layer, fb), iters=100)
        report("attention", f"lmprog {name} decode", times[name] * 1e6, "us",
               plan_us=plan * 1e6, TBps=kv_bytes / times[name] / 1e12)  # fmt: skip
    if "flashinfer" in times:
        import flashinfer

        raw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD"
        )
        meta = fb.attn_metadata.pages
        raw.plan(meta.indptr, meta.indices, meta.last_page_len, heads, kv_heads, d, 1,
                 q_data_type=dt, kv_data_type=dt)  # fmt: skip
        paged = (k_buf.view(-1, 1, kv_heads, d), v_buf.view(-1, 1, kv_heads, d))
        base = cuda_time(lambda: raw.run(q, paged), iters=100)
        report("attention", "FlashInfer raw decode", base * 1e6, "us", TBps=kv_bytes / base / 1e12)
        for name, t in times.items():
            report("attention", f"{name} / raw", t / base, "x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--parts", default="ceilings,decode,offline,attention")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    from machine_info import header

    print(f"bench_gpu --shape {args.shape} --parts {','.join(sorted(args.parts))}; {header()}")
    print(
        f"GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch {torch.__version__}"
    )
    copy_bw, flops = ceilings()
    if args.parts & {"decode", "offline"}:
        bench_engine(args, copy_bw, flops)
    if "attention" in args.parts:
        bench_attention()
    if "hf" in args.parts:
        torch.cuda.empty_cache()
        bench_hf(args)
    if args.json:
        gpu = torch.cuda.get_device_name()
        Path(args.json).write_text(
            json.dumps({"gpu": gpu, "shape": args.shape, "rows": ROWS}, indent=1)
        )


if __name__ == "__main__":
    main()
