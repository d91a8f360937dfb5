"""Event-loop lag of the API process: how long GET /health takes while large prompts are being
tokenized, against the same probe on an idle server in the same run.

    python benchmarks/bench_event_loop.py                      # starts its own server
    python benchmarks/bench_event_loop.py --base-url http://127.0.0.1:30000

Tokenization runs off the event loop, so every other connection should answer as fast as when
idle while a megabyte prompt is tokenized; a prompt that cannot fit the context is refused before
it is tokenized at all. Phases (one probe every 20 ms):

- idle: nothing else runs (the baseline);
- tokenize: `--clients` clients each POST /tokenize with `--text-mb` MB of text, back to back;
- completions: the same clients send /v1/completions prompts that pass the length bound but
  exceed the context after tokenizing (tokenized, then refused: 400);
- oversized: one /v1/completions with `--huge-mb` MB, refused at once (its time is printed).
"""

from __future__ import annotations

import argparse
import threading
import time

import requests
from latency_stats import percentile
from machine_info import header
from server_process import serve

SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 45 characters, 10 tokens


def probe(url: str, stop: threading.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        requests.get(f"{url}/health", timeout=30).raise_for_status()
        lags.append(time.perf_counter() - t0)
        stop.wait(0.02)


def load(url: str, route: str, body: dict, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        r = requests.post(f"{url}{route}", json=body, timeout=300)
        times.append(time.perf_counter() - t0)
        assert r.status_code in (200, 400), r.text[:300]


def phase(url: str, seconds: float, clients: int, route: str | None, body: dict) -> dict:
    stop, lags, times = threading.Event(), [], []
    threads = [threading.Thread(target=probe, args=(url, stop, lags))]
    if route is not None:
        threads += [
            threading.Thread(target=load, args=(url, route, body, stop, times))
            for _ in range(clients)
        ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    ms = [x * 1000 for x in lags]
    return {
        "probes": len(ms),
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "max": max(ms),
        "requests": len(times),
        "request_s": sum(times) / len(times) if times else float("nan"),
    }


def run(url: str, args: argparse.Namespace) -> None:
    info = requests.get(f"{url}/get_model_info", timeout=30).json()
    context = info["context_length"]
    text = SENTENCE * int(args.text_mb * 1e6 / len(SENTENCE))
    # Passes the bound (at most context x the longest token's bytes) but has far more tokens.
    over = SENTENCE * (context * 4 // 10)
    rows = [
        ("idle (baseline)", phase(url, args.seconds, 0, None, {})),
        (
            f"{args.clients} x /tokenize {args.text_mb:g} MB",
            phase(url, args.seconds, args.clients, "/tokenize", {"text": text}),
        ),
        (
            f"{args.clients} x /v1/completions {len(over) / 1e3:.0f} kB (> context)",
            phase(url, args.seconds, args.clients, "/v1/completions", {"prompt": over}),
        ),
    ]
    huge = "word " * int(args.huge_mb * 1e6 / 5)
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/completions", json={"prompt": huge}, timeout=300)
    refused = time.perf_counter() - t0
    base = rows[0][1]["p99"]
    print("\n| phase | /health p50 ms | p99 ms | max ms | p99 vs idle | requests | s per request |")
    print("|---|---|---|---|---|---|---|")
    for name, r_ in rows:
        print(
            f"| {name} | {r_['p50']:.1f} | {r_['p99']:.1f} | {r_['max']:.1f} | "
            f"{r_['p99'] / base:.2f}x | {r_['requests']} | {r_['request_s']:.2f} |"
        )
    code = r.json()["error"].get("code")
    print(f"\n{args.huge_mb:g} MB prompt: HTTP {r.status_code} (code {code}) after {refused:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--text-mb", type=float, default=1.0)
    p.add_argument("--huge-mb", type=float, default=15.0)
    args = p.parse_args()
    print(f"# bench_event_loop: {header()}; GET /health every 20 ms, {args.seconds:g} s a phase")
    if args.base_url:
        run(args.base_url, args)
        return
    with serve([], timeout=300, label="event-loop") as url:
        run(url, args)


if __name__ == "__main__":
    main()
