"""Tensor parallelism on CPU: the offline engine at tp 1 against tp 2, in one run.

    python benchmarks/bench_tp.py            # a 0.4B Llama shape, random weights
    python benchmarks/bench_tp.py --quick    # a smoke run
    python benchmarks/bench_tp.py --plot tp.png

On one CPU machine the ranks split its cores (tp 1 runs on all of them, each of tp 2's ranks on
half), so tensor parallelism adds no compute here: what this measures is its cost, the
all-reduces (two per layer plus the embedding's) and the logits gather over gloo, and the step
message rank 0 sends. It gains where each rank has its own device. Both engines get the same
model shape with `load_format="dummy"` weights (nothing can be downloaded here), greedy,
`ignore_eos`, so every run computes the same number of tokens:

- decode: one request of `--decode-tokens` tokens after a short prompt (tokens/s, ms/step)
- batch: `--batch` requests of `--batch-tokens` tokens each after 64-token prompts (tokens/s)
- prefill: `--batch` 512-token prompts, one token each (prompt tokens/s)

First, the all-reduce between two local ranks, through gloo and through shared memory (the
path CPU ranks on one machine take), for a decode step's and a prefill's activations; then the
engines: tp 1 as users run it (all cores, the C++ decode stack), tp 1 restricted to what one
rank of tp 2 runs (one thread, per-layer ops: the compute a rank would take alone), and tp 2.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import torch
import transformers
from machine_info import header
from plotting import Bars, add_plot_flag, check_plot_path, save
from server_process import free_port

from lmprog import LLM, SamplingParams
from lmprog.runtime.model_loader.dummy_folder import write_dummy_model_folder

SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def prompts(n: int, length: int, seed: int) -> list[dict]:
    return [{"prompt_token_ids": [(seed * 7919 + i * 31 + j * 17) % 31000 + 3
                                  for j in range(length)]} for i in range(n)]  # fmt: skip


def timed(llm: LLM, batch: list[dict], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def _collective_worker(rank: int, addr: str, use_shm: bool, shapes: list, out) -> None:
    from lmprog.runtime.distributed.parallel_state import destroy_tp_group, init_tp_group

    torch.set_num_threads(1)
    os.environ["LMPROG_TP_SHM"] = "1" if use_shm else "0"
    tp = init_tp_group(rank, 2, addr, "cpu", 60, one_machine=True)
    for shape in shapes:
        x = torch.ones(shape)
        for _ in range(20):
            tp.all_reduce(x)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            tp.all_reduce(x)
        if rank == 0:
            out.put((use_shm, shape, (time.perf_counter() - t0) / n * 1e6))
    destroy_tp_group(tp)


def collective_latency(shapes: list) -> dict:
    """Microseconds per all-reduce between two local ranks: {(shm?, shape): us}."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results = {}
    for use_shm in (False, True):
        addr = f"127.0.0.1:{free_port()}"
        procs = [ctx.Process(target=_collective_worker, args=(r, addr, use_shm, shapes, out))
                 for r in range(2)]  # fmt: skip
        for p in procs:
            p.start()
        for _ in shapes:
            shm, shape, us = out.get(timeout=120)
            results[(shm, tuple(shape))] = us
        for p in procs:
            p.join()
    return results


def run(tp: int, folder: str, args: argparse.Namespace, **extra) -> dict[str, float]:
    t0 = time.perf_counter()
    llm = LLM(folder, tensor_parallel_size=tp, load_format="dummy", dtype="float32", seed=0,
              max_total_tokens=16384, **extra)  # fmt: skip
    result = {"load_s": time.perf_counter() - t0}
    timed(llm, prompts(1, 16, 0), 4)  # warm-up
    wall, n = timed(llm, prompts(1, 16, 1), args.decode_tokens)
    result["decode_tok_s"], result["decode_ms"] = n / wall, 1000 * wall / n
    wall, n = timed(llm, prompts(args.batch, 64, 2), args.batch_tokens)
    result["batch_tok_s"] = n / wall
    wall, _ = timed(llm, prompts(args.batch, 512, 3), 1)
    result["prefill_tok_s"] = args.batch * 512 / wall
    llm.shutdown()
    return result


def plot(
    path: str,
    shapes: list[list[int]],
    latency: dict[tuple[bool, tuple[int, ...]], float],
    results: dict[str, dict[str, float]],
    batch: int,
) -> None:
    """Both tables: all-reduce microseconds, gloo against shared memory (log: they differ
    ~50x); then the engines, a color per engine, a panel per unit (tok/s on a log axis, as
    prefill runs ~100x decode)."""
    allreduce = Bars(
        [f"{a} x {b} fp32" for a, b in shapes],
        {
            "gloo": [latency[(False, tuple(s))] for s in shapes],
            "shared memory": [latency[(True, tuple(s))] for s in shapes],
        },
        "microseconds per all-reduce",
        title="all-reduce between 2 local ranks (1 thread each)",
        logy=True,
    )
    names = list(results)
    rates = {"decode, 1 request": "decode_tok_s", f"batch of {batch}": "batch_tok_s"}
    rates[f"prefill {batch} x 512"] = "prefill_tok_s"
    engines = [
        Bars(
            list(rates),
            {n: [results[n][key] for key in rates.values()] for n in names},
            "tok/s",
            title="engine throughput",
            logy=True,
        ),
        Bars(["decode step"], {n: [results[n]["decode_ms"]] for n in names}, "ms", title="decode"),
        Bars(["load"], {n: [results[n]["load_s"]] for n in names}, "s", title="engine start"),
    ]
    title = "tensor parallelism on CPU: tp 1 against tp 2 (Llama shape, random weights, float32)"
    save(path, title, [allreduce, *engines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    add_plot_flag(parser)
    args = parser.parse_args()
    check_plot_path(args.plot)
    if args.quick:
        args.decode_tokens, args.batch, args.batch_tokens = 16, 4, 8
    print(header())
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    print(f"model: Llama shape ({shape}), random weights, float32")
    hidden = SHAPE["hidden_size"]
    shapes = [[1, hidden], [8, hidden], [512, hidden]]
    latency = collective_latency(shapes)
    print("\nall-reduce between 2 local ranks (1 thread each), microseconds per call:\n")
    print("| tensor | gloo | shared memory |\n|---|---|---|")
    for shape in shapes:
        gloo, shm = latency[(False, tuple(shape))], latency[(True, tuple(shape))]
        print(f"| {shape[0]} x {shape[1]} fp32 | {gloo:.0f} | {shm:.0f} |")
    layers = SHAPE["num_hidden_layers"]
    print(f"(a step runs {2 * layers + 1} all-reduces: two per layer and the embedding's)")

    folder = str(write_dummy_model_folder(tempfile.mkdtemp(), transformers.LlamaConfig(**SHAPE)))
    one_thread = {"cpu_threads": 1}
    os.environ["LMPROG_DECODE_STACK"] = "0"  # what each rank runs: per-layer ops
    results = {"tp 1, a rank's share (1 thread, per-layer ops)": run(1, folder, args, **one_thread)}
    del os.environ["LMPROG_DECODE_STACK"]
    results["tp 1 (2 threads)"] = run(1, folder, args)
    results["tp 2 (1 thread each)"] = run(2, folder, args)
    rows = [
        ("load (s)", "load_s", "{:.1f}"),
        ("decode, 1 request (tok/s)", "decode_tok_s", "{:.1f}"),
        ("decode step (ms)", "decode_ms", "{:.1f}"),
        (f"batch of {args.batch} (tok/s)", "batch_tok_s", "{:.1f}"),
        (f"prefill {args.batch} x 512 (tok/s)", "prefill_tok_s", "{:.0f}"),
    ]
    names = list(results)
    print("\n| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, key, fmt in rows:
        cells = " | ".join(fmt.format(results[n][key]) for n in names)
        print(f"| {label} | {cells} |")
    if args.plot:
        plot(args.plot, shapes, latency, results, args.batch)


if __name__ == "__main__":
    main()
