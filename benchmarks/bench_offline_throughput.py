"""Offline throughput: N prompts x input/output lengths through `LLM.generate`.

    python benchmarks/bench_offline_throughput.py --num-prompts 64 --input-len 64 --output-len 128 \
        --compare-hf

Every sequence generates exactly `--output-len` tokens (ignore_eos), greedy, so both engines do the
same work. With `--compare-hf`, HF transformers `generate` runs in the same process on the same
weights, batched (`--hf-batch-size`, left-padded), and the table shows the ratio. With
`--compare-torch`, the same workload also runs on lmprog's torch path (no sgl_kernel) in a
subprocess, for the kernels' speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
from machine_info import header

from lmprog.runtime.layers.kernels import cpu_path


def make_prompts(tokenizer, n: int, input_len: int, seed: int) -> list[list[int]]:
    """Deterministic random prompts of exactly `input_len` ordinary (non-special) tokens."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(n)]


def bench_lmprog(llm, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    from lmprog import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def build_hf_model(llm, dtype: torch.dtype):
    """HF transformers' model on the weights lmprog loaded (its modelling code, our loader)."""
    from transformers import AutoModelForCausalLM

    loaded = llm.scheduler.model_runner.loaded
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(loaded.weights()), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()


@torch.inference_mode()
def bench_hf(model, tokenizer, prompts: list[list[int]], output_len: int, batch_size: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_out = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad,
        )
        n_out += (out.shape[1] - width) * len(chunk)
    return time.perf_counter() - t0, n_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-hf", action="store_true")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument(
        "--dtype", default="auto", help="lmprog's dtype (auto: bf16 on CPUs with it)"
    )
    parser.add_argument(
        "--hf-dtype", default=None, help="HF's dtype (default: the one lmprog resolved to)"
    )
    parser.add_argument(
        "--compare-torch",
        action="store_true",
        help="also run the same workload on the torch path (LMPROG_CPU_ISA=torch, a subprocess)",
    )
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from lmprog import LLM

    llm = LLM(
        model=args.model,
        max_running_requests=args.max_running_requests,
        seed=args.seed,
        attention_backend=args.attention_backend,
        dtype=args.dtype,
    )
    dtype = llm.scheduler.model_runner.dtype
    prompts = make_prompts(llm.get_tokenizer(), args.num_prompts, args.input_len, args.seed)
    rows = []
    t, n = bench_lmprog(llm, prompts, args.output_len)
    path = cpu_path()
    if args.row_only:
        print(json.dumps({"t": t, "n": n, "path": path}))
        return
    backend = llm.scheduler.model_runner.attention_backend
    rows.append((f"lmprog LLM.generate ({path}, attention {backend}, {dtype})", t, n))
    if args.compare_torch:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row-only"]
        cmd = [c for c in cmd if c != "--compare-torch"]
        env = dict(os.environ, LMPROG_CPU_ISA="torch")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            ("lmprog LLM.generate (torch path, attention torch_native)", row["t"], row["n"])
        )
    if args.compare_hf:
        hf_dtype = getattr(torch, args.hf_dtype) if args.hf_dtype else dtype
        hf = build_hf_model(llm, hf_dtype)
        t_hf, n_hf = bench_hf(hf, llm.get_tokenizer(), prompts, args.output_len, args.hf_batch_size)
        rows.append((f"HF generate (batch {args.hf_batch_size}, {hf_dtype})", t_hf, n_hf))

    print(
        f"\n{args.num_prompts} prompts x {args.input_len} input / {args.output_len} output tokens, "
        f"model {args.model}, {torch.get_num_threads()} threads, {header()}"
    )
    print("| engine | time (s) | output tokens | output tok/s | vs HF |")
    print("|---|---|---|---|---|")
    base = rows[-1][2] / rows[-1][1] if args.compare_hf else None
    for name, t, n in rows:
        ratio = f"{(n / t) / base:.2f}x" if base else "-"
        print(f"| {name} | {t:.1f} | {n} | {n / t:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
