"""Programs: SGLang-paper-style `@function` programs through `run_batch`, radix cache on vs off.

    python benchmarks/bench_programs.py            # the full sizes below
    python benchmarks/bench_programs.py --quick    # a smoke run: 8 / 4 / 4 programs
    python benchmarks/bench_programs.py --programs fork --fork-programs 32

Three programs, each run as one `run_batch` call (`--num-threads` concurrent runs) against a
`launch_server` (SmolLM2-135M-Instruct by default) over `RuntimeEndpoint`:
- few-shot: a fixed prefix of `--few-shot-examples` worked word problems ("Question: ...
  Answer: ..."; 20 examples, about 930 tokens), built from word lists and arithmetic with
  `--seed`, then the question argument; `gen(max_tokens=16, stop="\\n", temperature=0)`.
  `--num-programs` questions (64). The prefix is bound (`.bind`), so run_batch's trace finds it.
- chat: a system message and 3 user/assistant turns, the user messages from the arguments; each
  reply `gen(max_tokens=24, temperature=0)`. `--chat-programs` conversations (16).
- fork: a topic prompt, then `s.fork(3)`; each branch gets its own instruction and generates 16
  tokens (greedy); then `join()`. `--fork-programs` programs (16).

The script starts its own servers, one after the other and never both at once: first with the
radix cache on (the default), then with `--disable-radix-cache`; it stops each with SIGTERM and
expects exit code 0. Per program and server: a warm-up batch of `--warmup` runs with other
arguments (not timed), then `flush_cache` so the timed batch starts on a cold cache. Timed is the
wall time of the `run_batch` call, so programs/s includes HTTP and the client's threads. The hit
rate is that batch's prefix-cache hits over its prompt tokens: the deltas of the scheduler's
cumulative `cache_hit_tokens` and `cache_query_tokens` (`/get_server_info`) across the call.
That includes run_batch's own prefill of the traced constant prefix (all misses, once per batch).
`--programs` runs a subset.

Sanity (light): every program must produce non-empty answers, or the script exits 1 after the
report. It prints the total generated characters, and how many programs' outputs differ between
the two servers (greedy; informational, since batching can flip a near-tie).

Target: few-shot programs/s with the cache on >= 3x with it off. A `--quick` batch is too small
for that check to mean much (a few seconds of work either way, so machine noise decides it).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server_process import serve

from lmprog import RuntimeEndpoint, assistant, function, gen, system, user

SPEEDUP_TARGET = 3.0
QUICK = {  # --quick: applies to the size flags left at their defaults
    "few_shot_examples": 5,
    "num_programs": 8,
    "chat_programs": 4,
    "fork_programs": 4,
    "warmup": 1,
}

# ---- data: word lists, arithmetic, deterministic from --seed ---------------------------------
NAMES = ["Maya", "Omar", "Lena", "Kofi", "Ines", "Tariq", "Yuki", "Pavel", "Amara", "Diego"]
ITEMS = ["apples", "marbles", "stamps", "pencils", "shells", "coins", "stickers", "books"]
TOPICS = [
    "volcanoes", "the moon", "bees", "rainbows", "glaciers", "owls", "tides", "deserts",
    "coral reefs", "thunderstorms", "penguins", "comets", "rivers", "mushrooms", "whales",
    "auroras", "bamboo", "caves", "lightning", "octopuses",
]  # fmt: skip
FOLLOW_UPS = ["Why does that happen?", "Give me one example.", "What is a common myth about it?"]
CLOSERS = ["Summarize that in one sentence.", "What should I read next?", "Thank you!"]
BRANCHES = [  # the fork program's per-branch instructions
    "Write a one-line poem about it:",
    "List three words related to it:",
    "Give one surprising fact about it:",
]


def word_problem(rng: random.Random) -> tuple[str, str]:
    """One question and its worked answer (a single line, so `stop="\\n"` ends it)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(20, 99), rng.randint(2, 19)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and finds {b} more. How many {item} now?"
        return question, f"{a} + {b} = {a + b}. {name} has {a + b} {item}."
    question = f"{name} has {a} {item} and gives {b} away. How many {item} are left?"
    return question, f"{a} - {b} = {a - b}. {name} has {a - b} {item} left."


def few_shot_prefix(n_examples: int, seed: int) -> str:
    rng = random.Random(seed)
    text = "Solve each word problem. Show the arithmetic, then the answer.\n\n"
    for _ in range(n_examples):
        question, answer = word_problem(rng)
        text += f"Question: {question}\nAnswer: {answer}\n\n"
    return text


def few_shot_args(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"question": word_problem(rng)[0]} for _ in range(n)]


def chat_args(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "first": f"Tell me one fact about {rng.choice(TOPICS)}.",
            "second": rng.choice(FOLLOW_UPS),
            "third": rng.choice(CLOSERS),
        }
        for _ in range(n)
    ]


def fork_args(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"topic": rng.choice(TOPICS)} for _ in range(n)]


# ---- programs ---------------------------------------------------------------------------------
@function
def few_shot_qa(s: Any, examples: str, question: str) -> None:
    s += examples  # bound, so it is the traced constant prefix run_batch prefills once
    s += "Question: " + question + "\nAnswer:"
    s += gen("answer", max_tokens=16, stop="\n", temperature=0)


@function
def multi_turn_chat(s: Any, first: str, second: str, third: str) -> None:
    s += system("You are a helpful assistant. Answer briefly.")
    for i, message in enumerate((first, second, third)):
        s += user(message)
        s += assistant(gen(f"reply{i}", max_tokens=24, temperature=0))


@function
def fork_ideas(s: Any, topic: str) -> None:
    s += "You write short notes for a science museum.\n"
    s += f"Topic: {topic}.\n"
    forks = s.fork(len(BRANCHES))
    for f, instruction in zip(forks, BRANCHES):
        f += instruction + gen("idea", max_tokens=16, temperature=0)
    forks.join()  # the parent's "idea" becomes the list of the branches' ideas


@dataclass
class Program:
    name: str
    function: Any
    make_args: Callable[[int, int], list[dict[str, Any]]]
    outputs: Callable[[Any], list[str]]  # a finished state's generated texts
    size: int
    prompt_var: str | None = None  # a gen whose server-counted prompt tokens are reported


@dataclass
class Row:
    program: str
    cache: str
    programs: int
    seconds: float
    hit_rate: float
    outputs: list[list[str]] = field(default_factory=list, repr=False)
    prompt_tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.programs / self.seconds

    @property
    def empty(self) -> int:
        """Programs with an empty (or whitespace-only) answer."""
        return sum(not all(o.strip() for o in outs) for outs in self.outputs)

    @property
    def chars(self) -> int:
        return sum(len(o) for outs in self.outputs for o in outs)


PROGRAMS = ("few-shot", "chat", "fork")


def programs(args: argparse.Namespace) -> list[Program]:
    examples = few_shot_prefix(args.few_shot_examples, args.seed)
    return [
        Program(
            "few-shot",
            few_shot_qa.bind(examples=examples),
            few_shot_args,
            lambda s: [s["answer"]],
            args.num_programs,
            prompt_var="answer",
        ),
        Program(
            "chat",
            multi_turn_chat,
            chat_args,
            lambda s: [s[f"reply{i}"] for i in range(3)],
            args.chat_programs,
        ),
        Program("fork", fork_ideas, fork_args, lambda s: list(s["idea"]), args.fork_programs),
    ]


# ---- servers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def server(args: argparse.Namespace, radix_cache: bool) -> Iterator[str]:
    """A server for one configuration (server_process.serve); yields its base URL."""
    flags = ["--model-path", args.model] + ([] if radix_cache else ["--disable-radix-cache"])
    with serve(flags, args.server_timeout, "programs", args.port) as base_url:
        yield base_url


# ---- measurement ------------------------------------------------------------------------------
def cache_counters(backend: RuntimeEndpoint) -> tuple[int, int]:
    stats = backend.get_server_info()["scheduler"]
    return stats["cache_query_tokens"], stats["cache_hit_tokens"]


def flush(backend: RuntimeEndpoint) -> None:
    """flush_cache is refused (409) while requests run; the warm-up's have all answered, but the
    scheduler may not have released them yet."""
    for _ in range(50):
        if backend.flush_cache():
            return
        time.sleep(0.1)  # polling the server: there is no completion event to wait on
    raise RuntimeError("flush_cache was refused for 5 s: requests still running on the server")


def run_program(
    program: Program, backend: RuntimeEndpoint, cache: str, args: argparse.Namespace
) -> Row:
    warm = program.make_args(args.warmup, args.seed + 1)  # other arguments than the timed ones
    timed = program.make_args(program.size, args.seed + 2)
    program.function.run_batch(warm, backend=backend, num_threads=args.num_threads)
    flush(backend)
    query0, hit0 = cache_counters(backend)
    t0 = time.perf_counter()
    states = program.function.run_batch(timed, backend=backend, num_threads=args.num_threads)
    seconds = time.perf_counter() - t0
    query1, hit1 = cache_counters(backend)
    hit_rate = (hit1 - hit0) / max(query1 - query0, 1)
    outputs = [program.outputs(s) for s in states]
    prompt_tokens = []
    if program.prompt_var:
        prompt_tokens = [s.get_meta_info(program.prompt_var)["prompt_tokens"] for s in states]
    return Row(program.name, cache, len(timed), seconds, hit_rate, outputs, prompt_tokens)


# ---- report -----------------------------------------------------------------------------------
def print_table(rows: dict[str, dict[str, Row]]) -> None:
    print("| program | cache | programs | seconds | programs/s | speedup vs off | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for by_cache in rows.values():
        off = by_cache["off"]
        for r in by_cache.values():
            print(
                f"| {r.program} | {r.cache} | {r.programs} | {r.seconds:.2f} | {r.rate:.2f} "
                f"| {r.rate / off.rate:.2f}x | {r.hit_rate:.1%} |"
            )


def sanity(rows: dict[str, dict[str, Row]]) -> bool:
    """Prints the output checks; True when every program produced non-empty answers."""
    all_rows = [r for by_cache in rows.values() for r in by_cache.values()]
    empty = {f"{r.program}/{r.cache}": r.empty for r in all_rows if r.empty}
    differ = {
        name: sum(a != b for a, b in zip(by_cache["on"].outputs, by_cache["off"].outputs))
        for name, by_cache in rows.items()
    }
    print(
        f"outputs: {sum(r.chars for r in all_rows)} generated characters in total; "
        f"programs whose outputs differ on vs off (greedy, informational): "
        + ", ".join(f"{name} {n}/{rows[name]['on'].programs}" for name, n in differ.items())
    )
    if empty:
        print(f"FAIL: programs with an empty answer: {empty}")
    else:
        print("every program produced non-empty answers -> PASS")
    return not empty


def target(rows: dict[str, dict[str, Row]]) -> str:
    if "few-shot" not in rows:
        return "target: few-shot not run (--programs)"
    on, off = rows["few-shot"]["on"], rows["few-shot"]["off"]
    speedup = on.rate / off.rate
    return (
        f"target: few-shot programs/s with the cache on >= {SPEEDUP_TARGET:.0f}x with it off: "
        f"{on.rate:.2f} vs {off.rate:.2f} ({speedup:.2f}x) "
        f"-> {'PASS' if speedup >= SPEEDUP_TARGET else 'FAIL'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="8/4/4 programs, 5 examples")
    parser.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"comma-separated, of {', '.join(PROGRAMS)}"
    )
    parser.add_argument("--num-programs", type=int, default=64, help="few-shot questions")
    parser.add_argument("--few-shot-examples", type=int, default=20, help="in the prefix")
    parser.add_argument("--chat-programs", type=int, default=16)
    parser.add_argument("--fork-programs", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each batch")
    parser.add_argument("--num-threads", type=int, default=16, help="run_batch's threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--server-timeout", type=float, default=300, help="s to wait for it")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    for name in ("num_programs", "chat_programs", "fork_programs", "warmup", "num_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    names = args.programs.split(",")
    if unknown := sorted(set(names) - set(PROGRAMS)):
        parser.error(f"unknown programs {unknown}; supported: {', '.join(PROGRAMS)}")
    progs = [p for p in programs(args) if p.name in names]
    rows: dict[str, dict[str, Row]] = {p.name: {} for p in progs}
    for cache in ("on", "off"):  # one server at a time: they would share the cores
        with server(args, radix_cache=cache == "on") as base_url:
            backend = RuntimeEndpoint(base_url)
            for program in progs:
                rows[program.name][cache] = run_program(program, backend, cache, args)
                print(f"  {program.name}, cache {cache}: {rows[program.name][cache].seconds:.2f} s")

    quick = ", --quick" if args.quick else ""
    print(f"\nmodel {args.model}, {args.num_threads} run_batch threads{quick}")
    if "few-shot" in rows:
        tokens = rows["few-shot"]["on"].prompt_tokens
        print(
            f"few-shot prefix: {args.few_shot_examples} examples; prompts of "
            f"{min(tokens)}-{max(tokens)} tokens (server-counted)"
        )
    print_table(rows)
    ok = sanity(rows)
    print(target(rows))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
