"""Serving load: streamed /v1/completions against any OpenAI-compatible server, timed per request.

    python -m lmprog.launch_server &
    python benchmarks/bench_serving.py --max-concurrency 16 --num-prompts 64 --output-len 128
    python benchmarks/bench_serving.py --request-rate 4 --dataset shared-prefix --num-groups 4 \
        --prefix-len 512 --input-len 32 --json serving.json --plot serving.png
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8080 --model qwen  # llama.cpp

Works the same against lmprog's server, llama.cpp's `llama-server`, vLLM and SGLang: every request
is `POST {base_url}/v1/completions` with `stream: true`, greedy, `ignore_eos` (servers that do not
know it ignore it) and `stream_options.include_usage`. Per request it records TTFT (until the first
non-empty text chunk), inter-token latencies (gaps between later text chunks; a chunk counts as one
token unless the chunk carries a running `usage`, then a gap is split over the chunk's tokens),
end-to-end latency, and output tokens (the final usage chunk, else the counted chunk tokens).

Prompts are random words, so `--input-len` and `--prefix-len` are word counts, roughly tokens; the
table also shows the server-reported prompt tokens, which total tok/s uses when every reply has them.

`--compare-offline` then runs the same prompts through the in-process `lmprog.LLM` (greedy,
ignore_eos, `max_running_requests` = `--max-concurrency`) and prints the HTTP/offline output tok/s
ratio (the target: the HTTP path within 20% of the offline engine). It runs after the HTTP run, but
the server process still holds its threads and memory (the script prints a warning): on a small
CPU machine even an idle server takes some CPU time, so the offline number may come out low.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from latency_stats import percentile
from plotting import Bars, add_plot_flag, check_plot_path, save

try:
    import httpx
except ImportError:  # some environments ship the API-compatible fork under another name
    import httpx2 as httpx  # type: ignore[no-redef]

WORD_LIST = (
    "apple river stone cloud garden window music paper light forest silver market engine "
    "yellow winter planet bridge candle doctor island letter mountain ocean pencil rabbit "
    "school table village wagon zebra anchor basket castle dragon feather guitar harbor jacket "
    "kitten ladder mirror needle orange pepper quiet rocket saddle tunnel umbrella valley "
    "whistle bottle copper desert empire falcon glacier hammer iron jungle kettle lemon meadow "
    "number orbit pillow quartz ribbon spider timber unicorn velvet walnut young zipper"
)
WORDS = WORD_LIST.split()
TARGET_RATIO = 0.8  # the target: the HTTP path within 20% of the offline engine


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0  # s, until the first non-empty text chunk
    e2e: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, one entry per token after the first chunk
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server reported it in usage
    error: str = ""


# ---- datasets: lists of prompt strings --------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [words(rng, input_len) for _ in range(n)]


def shared_prefix_prompts(
    n: int, num_groups: int, prefix_len: int, input_len: int, seed: int
) -> list[str]:
    """Request i belongs to group i % num_groups, so the groups arrive interleaved."""
    rng = random.Random(seed)
    prefixes = [
        f"System {g}: you are a helpful assistant. Context: {words(rng, prefix_len)}\n\n"
        for g in range(num_groups)
    ]
    return [f"{prefixes[i % num_groups]}Question: {words(rng, input_len)}?" for i in range(n)]


# ---- one streamed request ---------------------------------------------------------------------
async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Result:
    res, t0 = Result(), time.perf_counter()
    last, n_seen, usage_out = t0, 0, None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {resp.status_code}: {text}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                chunk, now = json.loads(data), time.perf_counter()
                if "error" in chunk:
                    res.error = f"error in stream: {chunk['error']}"
                    return res
                usage = chunk.get("usage") or {}
                text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                if "completion_tokens" in usage:
                    usage_out = usage["completion_tokens"]
                    res.prompt_tokens = usage.get("prompt_tokens")
                if not text:
                    continue
                # A running usage (vLLM's continuous_usage_stats) says how many tokens this chunk
                # holds; without it, one chunk is one token.
                k = max(usage_out - n_seen, 1) if usage_out is not None else 1
                if n_seen == 0:
                    res.ttft = now - t0
                else:
                    res.itl.extend([(now - last) / k] * k)
                last, n_seen = now, n_seen + k
        res.e2e = time.perf_counter() - t0
        res.output_tokens = usage_out if usage_out is not None else n_seen
        res.ok = n_seen > 0 or res.output_tokens > 0
        res.error = "" if res.ok else "the stream ended without any text"
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:  # count it and keep going
        res.error = f"{type(e).__name__}: {e}"
    return res


def request_body(model: str, prompt: str, output_len: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(f"{base_url}/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        sys.exit(f"GET {base_url}/v1/models failed ({type(e).__name__}: {e}); is the server up?")
    assert models, f"GET {base_url}/v1/models listed no models; pass --model"
    return models[0]["id"]


async def run_load(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Result], float]:
    """Warm-up requests first (not measured); then every prompt, Poisson arrivals at
    `--request-rate`, at most `--max-concurrency` in flight. Returns results and duration (s)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30.0)  # a queued request may wait long on a busy CPU
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        if args.model is None:
            args.model = await first_model(client, args.base_url)
        url = f"{args.base_url}/v1/completions"
        rng = random.Random(args.seed + 1)  # warm-up prompts and arrival gaps
        for _ in range(args.warmup):
            res = await send(client, url, request_body(args.model, words(rng, 16), 4))
            if not res.ok:
                sys.exit(f"warm-up request to {url} failed: {res.error}")

        sem = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def one(prompt: str) -> Result:
            async with sem:
                return await send(client, url, request_body(args.model, prompt, args.output_len))

        tasks, t0 = [], time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


# ---- report -----------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarize(results: list[Result], duration: float, input_words: int) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    reported = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    # Server-reported prompt tokens when every reply has them, else the requested word counts.
    input_tokens = sum(reported) if len(reported) == len(done) else input_words * len(done)
    output_tokens = sum(r.output_tokens for r in done)
    ttft, itl = [r.ttft * 1e3 for r in done], [x * 1e3 for r in done for x in r.itl]
    e2e = [r.e2e for r in done]
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "server_prompt_tokens": sum(reported) if reported else None,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_tps": output_tokens / duration,
        "total_tps": (input_tokens + output_tokens) / duration,
        **{f"ttft_{k}_ms": v for k, v in stats(ttft).items()},
        **{f"itl_{k}_ms": v for k, v in stats(itl).items()},
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
    }


def stats(xs: list[float]) -> dict[str, float]:
    return {"mean": mean(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99)}


def strict(d: dict[str, Any]) -> dict[str, Any]:
    """inf and nan as null, so the JSON file is strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def print_table(s: dict[str, Any]) -> None:
    rows = [
        ("completed / failed requests", "{completed} / {failed}"),
        ("duration (s)", "{duration_s:.2f}"),
        ("input tokens (server-reported)", "{input_tokens} ({server_prompt_tokens})"),
        ("output tokens", "{output_tokens}"),
        ("request throughput (req/s)", "{request_throughput:.2f}"),
        ("output tok/s", "{output_tps:.1f}"),
        ("total (input + output) tok/s", "{total_tps:.1f}"),
        (
            "TTFT mean / p50 / p99 (ms)",
            "{ttft_mean_ms:.1f} / {ttft_p50_ms:.1f} / {ttft_p99_ms:.1f}",
        ),
        ("ITL mean / p50 / p99 (ms)", "{itl_mean_ms:.1f} / {itl_p50_ms:.1f} / {itl_p99_ms:.1f}"),
        ("E2E p50 / p99 (s)", "{e2e_p50_s:.2f} / {e2e_p99_s:.2f}"),
    ]
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value.format(**s)} |")


def plot(path: str, s: dict[str, Any], title: str) -> None:
    """The table's numbers as bars: tok/s (with the offline engine's when it ran), and TTFT, ITL
    and E2E latency in ms on a log axis (ITL is ~100x shorter than E2E)."""
    tps = {"HTTP output": s["output_tps"], "HTTP total (input + output)": s["total_tps"]}
    if "offline_output_tps" in s:
        tps["offline LLM.generate output"] = s["offline_output_tps"]
    throughput = Bars(
        list(tps),
        {"tok/s": list(tps.values())},
        "tok/s",
        title=f"throughput: {s['request_throughput']:.2f} req/s, "
        f"{s['completed']} completed / {s['failed']} failed requests",
    )
    latency = Bars(
        ["mean", "p50", "p99"],
        {
            "TTFT": [s["ttft_mean_ms"], s["ttft_p50_ms"], s["ttft_p99_ms"]],
            "ITL": [s["itl_mean_ms"], s["itl_p50_ms"], s["itl_p99_ms"]],
            "E2E": [math.nan, 1e3 * s["e2e_p50_s"], 1e3 * s["e2e_p99_s"]],
        },
        "latency (ms)",
        title="latency per request (ITL: per token)",
        logy=True,
    )
    save(path, title, [throughput, latency])


def run_offline(args: argparse.Namespace, prompts: list[str]) -> float:
    """Output tok/s of the in-process engine on the same prompts (after a small warm-up)."""
    from lmprog import LLM, SamplingParams

    print(
        f"\nWARNING: the server at {args.base_url} still holds its threads and memory; on a small "
        "CPU machine it competes with the offline engine, which lowers the offline number and "
        "flatters the HTTP/offline ratio."
    )
    engine_args = {"max_running_requests": args.max_concurrency} if args.max_concurrency else {}
    llm = LLM(args.offline_model, seed=args.seed, **engine_args)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer ...`")
    parser.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64, help="words per prompt/question")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-groups", type=int, default=4, help="shared-prefix: prefixes")
    parser.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: words")
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: unlimited")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    add_plot_flag(parser)
    parser.add_argument("--compare-offline", action="store_true")
    parser.add_argument(
        "--offline-model", default="smollm2-135m-instruct", help="must match the served model"
    )
    args = parser.parse_args()
    args.base_url = args.base_url.rstrip("/")
    check_plot_path(args.plot)

    if args.dataset == "random":
        prompts = random_prompts(args.num_prompts, args.input_len, args.seed)
        input_words, shape = args.input_len, f"{args.input_len} words"
    else:
        prompts = shared_prefix_prompts(
            args.num_prompts, args.num_groups, args.prefix_len, args.input_len, args.seed
        )
        input_words = args.prefix_len + args.input_len
        shape = f"{args.num_groups} prefixes of {args.prefix_len} words + {args.input_len} words"
    results, duration = asyncio.run(run_load(args, prompts))
    summary = summarize(results, duration, input_words)

    run_text = (
        f"{args.base_url}, model {args.model}: {args.dataset} dataset, {args.num_prompts} "
        f"prompts of {shape}, {args.output_len} output tokens; max concurrency "
        f"{args.max_concurrency or 'unlimited'}, request rate {args.request_rate} req/s"
    )
    print(f"\n{run_text}")
    print_table(summary)
    errors = [r.error for r in results if not r.ok]
    for err in errors[:5]:
        print(f"failed: {err}")
    if len(errors) > 5:
        print(f"... and {len(errors) - 5} more failures")

    if args.compare_offline:
        if math.isfinite(args.request_rate):
            print("note: with a finite --request-rate the HTTP run is paced, not saturated")
        offline = run_offline(args, prompts)
        ratio = summary["output_tps"] / offline
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print("| path | output tok/s |\n|---|---|")
        print(f"| HTTP | {summary['output_tps']:.1f} |\n| offline LLM.generate | {offline:.1f} |")
        print(f"HTTP / offline = {ratio:.2f} (target >= {TARGET_RATIO:.2f}) -> {verdict}")
        summary |= {"offline_output_tps": offline, "http_offline_ratio": ratio}
    if args.plot:
        plot(args.plot, summary, run_text.replace("; ", "\n"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": strict(vars(args)), "summary": strict(summary)}, f, indent=2)


if __name__ == "__main__":
    main()
