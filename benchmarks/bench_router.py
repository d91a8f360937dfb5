"""Data-parallel routing: cache_aware against round_robin over local replicas, in one run.

    python benchmarks/bench_router.py            # 2 replicas, cores // 2 threads each
    python benchmarks/bench_router.py --quick    # a smoke run (~4x smaller)
    python benchmarks/bench_router.py --plot router.png

The replicas (`python -m lmprog.launch_server --max-total-tokens T`, started as `--dp-size` starts
them) run for the whole script; each policy gets a fresh router (`python -m lmprog.router
--worker-urls ... --policy P`) and flushed replica caches. Workloads, one after the other:

- multi-turn: `--conversations` chats x `--turns` turns on /v1/chat/completions. Each chat is a
  user: a first message of ~`--opening-words` words (notes on one subject), then turn k+1 is sent
  when turn k's reply is back, with that reply and a short follow-up question. `--concurrency`
  users at a time (a user keeps a slot from first turn to last; the next one starts when one
  leaves). Greedy, `--reply-tokens` tokens per reply.
- few-shot: `--prefixes` few-shot prompts (worked examples on one subject each, ~`--prefix-words`
  words) x `--questions` questions each on /v1/completions, in a shuffled order, at most
  `--concurrency` in flight. Greedy, 8 tokens.

Each replica's KV pool (`--max-total-tokens`) is smaller than the workload's distinct prefixes
together but holds about half of them: where a request lands decides whether its prefix is still
cached. Hit rate = cache_hit_tokens / cache_query_tokens summed over the replicas' scheduler
counters (prompt tokens found cached / prompt tokens). Targets: cache_aware's hit rate >= 1.5x
round_robin's and a higher throughput, on each workload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from machine_info import header
from plotting import Bars, add_plot_flag, check_plot_path, save
from server_process import free_port

from lmprog.router.replicas import Replicas

try:
    import httpx
except ImportError:  # some environments ship the API-compatible fork under another name
    import httpx2 as httpx  # type: ignore[no-redef]

HIT_RATIO_TARGET = 1.5
POLICIES = ("round_robin", "cache_aware")
SUBJECTS = [
    "volcanoes", "honeybees", "glaciers", "lighthouses", "comets", "coral reefs", "windmills",
    "owls", "tides", "deserts", "bridges", "rainforests", "submarines", "penguins", "castles",
    "earthquakes", "violins", "satellites", "mushrooms", "canals", "tornadoes", "railways",
    "dolphins", "pyramids", "auroras", "bamboo", "telescopes", "wolves", "caves", "kites",
    "salmon", "geysers",
]  # fmt: skip
FILLER_TEXT = (
    "people often ask how it works, why it matters, what it looked like long ago, how it "
    "changes with the seasons, and what a careful observer would notice first when visiting"
)
FILLER = FILLER_TEXT.split()
FOLLOW_UPS = [
    "Can you explain that in simpler words for a child?",
    "What is one surprising detail most people do not know?",
    "How would you summarize everything so far in one sentence?",
    "What should I read next to learn more about it?",
]


@dataclass
class Run:
    workload: str
    policy: str
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    hit_tokens: int = 0
    query_tokens: int = 0
    placement: str = ""

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds


# ---- workloads ---------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


def few_shot_prompts(args: argparse.Namespace) -> list[str]:
    """`prefixes` x `questions` prompts: each prefix is worked Q/A examples on one subject."""
    rng = random.Random(1)
    prompts = []
    for subject in SUBJECTS[: args.prefixes]:
        shots, n = [], 0
        while n < args.prefix_words:
            shot = f"Question about {subject}: {words(rng, 12)}?\nAnswer: {words(rng, 14)}.\n"
            shots.append(shot)
            n += len(shot.split())
        prefix = f"Examples about {subject}.\n" + "".join(shots)
        for q in range(args.questions):
            prompts.append(
                f"{prefix}Question about {subject} number {q}: {words(rng, 8)}?\nAnswer:"
            )
    rng.shuffle(prompts)
    return prompts


async def run_few_shot(client: httpx.AsyncClient, url: str, args: argparse.Namespace) -> int:
    limit = asyncio.Semaphore(args.concurrency)

    async def one(prompt: str) -> int:
        body = {"model": args.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        body["ignore_eos"] = True
        async with limit:
            r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return sum(await asyncio.gather(*(one(p) for p in few_shot_prompts(args))))


async def run_multi_turn(client: httpx.AsyncClient, url: str, args: argparse.Namespace) -> int:
    users = asyncio.Semaphore(args.concurrency)  # a user holds a slot from first turn to last
    rng = random.Random(2)

    async def chat(i: int) -> int:
        subject = SUBJECTS[i % len(SUBJECTS)]
        opening = f"{subject.capitalize()}: here are my notes on {subject}. "
        opening += f"{words(rng, args.opening_words)}. What do you make of them?"
        messages = [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": opening},
        ]
        tokens = 0
        async with users:
            for turn in range(args.turns):
                body = {"model": args.model, "messages": messages, "temperature": 0}
                body["max_tokens"] = args.reply_tokens
                r = await client.post(f"{url}/v1/chat/completions", json=body)
                r.raise_for_status()
                reply = r.json()
                tokens += reply["usage"]["completion_tokens"]
                answer = reply["choices"][0]["message"]["content"]
                messages.append({"role": "assistant", "content": answer})
                messages.append({"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
        return tokens

    return sum(await asyncio.gather(*(chat(i) for i in range(args.conversations))))


WORKLOADS = {"multi-turn": run_multi_turn, "few-shot": run_few_shot}


# ---- one policy --------------------------------------------------------------------------------
def start_router(worker_urls: list[str], policy: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmprog.router", "--worker-urls", *worker_urls]
    cmd += ["--policy", policy, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {policy} router exited with code {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)  # polling a subprocess: nothing to wait on instead
    raise RuntimeError(f"the {policy} router did not answer in 60 s")


def counters(worker_urls: list[str]) -> tuple[int, int]:
    hit = query = 0
    for w in worker_urls:
        stats = requests.get(f"{w}/get_server_info", timeout=30).json()["scheduler"]
        hit, query = hit + stats["cache_hit_tokens"], query + stats["cache_query_tokens"]
    return hit, query


def run_policy(policy: str, worker_urls: list[str], args: argparse.Namespace) -> list[Run]:
    proc, url = start_router(worker_urls, policy)
    runs = []
    try:
        for name, workload in WORKLOADS.items():
            if name not in args.workloads:
                continue
            flushed = requests.post(f"{url}/flush_cache", timeout=30)
            assert flushed.status_code == 200, f"flush_cache failed: {flushed.text}"
            served0 = {
                w["url"]: w["served"] for w in requests.get(f"{url}/workers").json()["workers"]
            }
            hit0, query0 = counters(worker_urls)
            t0 = time.perf_counter()
            output_tokens = asyncio.run(_with_client(workload, url, args))
            seconds = time.perf_counter() - t0
            hit1, query1 = counters(worker_urls)
            served = [
                w["served"] - served0[w["url"]]
                for w in requests.get(f"{url}/workers").json()["workers"]
            ]
            run = Run(
                name, policy, sum(served), output_tokens, seconds, hit1 - hit0, query1 - query0
            )
            run.placement = " / ".join(map(str, served))
            print(
                f"  {name:10s} {policy:12s} {seconds:6.1f} s  hit rate {run.hit_rate:.1%}",
                flush=True,
            )
            runs.append(run)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return runs


async def _with_client(workload, url: str, args: argparse.Namespace) -> int:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
        return await workload(client, url, args)


# ---- main --------------------------------------------------------------------------------------
def print_table(runs: list[Run], args: argparse.Namespace) -> bool:
    threads = max(1, len(os.sched_getaffinity(0)) // args.dp_size)
    print(
        f"\n{header()}; {args.dp_size} replicas x {threads} thread(s), "
        f"--max-total-tokens {args.max_total_tokens} each; SmolLM2-135M-Instruct, default dtype\n"
    )
    print(
        "| workload | policy | requests (per replica) | wall s | req/s | output tok/s | hit rate |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r.workload} | {r.policy} | {r.requests} ({r.placement}) | {r.seconds:.1f} | "
            f"{r.rps:.2f} | {r.output_tps:.1f} | {r.hit_rate:.1%} |"
        )
    ok = True
    print()
    for name in args.workloads:
        by = {r.policy: r for r in runs if r.workload == name}
        rr, ca = by["round_robin"], by["cache_aware"]
        ratio = ca.hit_rate / rr.hit_rate if rr.hit_rate else float("inf")
        speedup = ca.rps / rr.rps
        met = ratio >= HIT_RATIO_TARGET and speedup > 1
        ok &= met
        print(
            f"{name}: cache_aware / round_robin hit rate {ratio:.3f}x (target >= "
            f"{HIT_RATIO_TARGET}), throughput {speedup:.2f}x (target > 1): "
            f"{'met' if met else 'NOT met'}"
        )
    return ok


def plot(path: str, runs: list[Run], title: str) -> None:
    """The table per workload, a bar per policy: hit rate, req/s and output tok/s."""
    names = list(dict.fromkeys(r.workload for r in runs))
    by = {(r.workload, r.policy): r for r in runs}

    def series(value: Callable[[Run], float]) -> dict[str, list[float]]:
        return {p: [value(by[n, p]) for n in names] for p in POLICIES}

    panels = [
        Bars(
            names, series(lambda r: 100 * r.hit_rate), "cached prompt tokens (%)", title="hit rate"
        ),
        Bars(names, series(lambda r: r.rps), "requests/s", title="request throughput"),
        Bars(names, series(lambda r: r.output_tps), "output tok/s", title="output throughput"),
    ]
    save(path, title, panels, ncols=3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--max-total-tokens", type=int, default=2560, help="Each replica's KV pool.")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--opening-words", type=int, default=100, help="A chat's first message.")
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-words", type=int, default=360, help="~1.4 tokens per word here.")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument(
        "--concurrency", type=int, default=16, help="Chats (multi-turn), requests (few-shot)."
    )
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="8 chats x 3 turns, 4 prefixes x 4.")
    p.add_argument("--server-flags", default="", help="More flags for each replica, one string.")
    add_plot_flag(p)
    args = p.parse_args()
    check_plot_path(args.plot)
    if args.quick:
        args.conversations, args.turns, args.prefixes, args.questions = 8, 3, 4, 4
    flags = ["--max-total-tokens", str(args.max_total_tokens), *args.server_flags.split()]
    fd, log_path = tempfile.mkstemp(prefix="bench-router-replicas-", suffix=".log")
    log = os.fdopen(fd, "w")
    print(f"replica logs: {log_path}", flush=True)
    replicas = Replicas(flags, args.dp_size, log)
    try:
        t0 = time.perf_counter()
        replicas.wait_ready(600)
        print(f"{args.dp_size} replicas ready in {time.perf_counter() - t0:.1f} s", flush=True)
        for url in replicas.urls:  # the first request of a process pays one-time costs
            requests.post(
                f"{url}/generate",
                json={"text": "warm up", "sampling_params": {"max_new_tokens": 4}},
            )
        args.model = requests.get(f"{replicas.urls[0]}/v1/models").json()["data"][0]["id"]
        runs = [run for policy in POLICIES for run in run_policy(policy, replicas.urls, args)]
    finally:
        codes = replicas.stop()
    ok = print_table(runs, args)
    if args.plot:
        threads = max(1, len(os.sched_getaffinity(0)) // args.dp_size)
        title = (
            f"cache_aware vs round_robin routing: {args.dp_size} replicas x {threads} thread(s), "
            f"--max-total-tokens {args.max_total_tokens} each"
        )
        plot(args.plot, runs, title)
    if any(codes):
        sys.exit(f"FAIL: a replica exited with {codes} after SIGTERM")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
