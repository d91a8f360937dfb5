"""Prefix sharing: the radix cache on vs off on SGLang-paper-shaped workloads through `LLM.generate`.

    python benchmarks/bench_prefix_sharing.py            # the full sizes below
    python benchmarks/bench_prefix_sharing.py --quick    # ~8x smaller: a smoke run
    python benchmarks/bench_prefix_sharing.py --plot prefix_sharing.png

Workloads (each starts on a cold cache; prompts are token ids, so shared prefixes match exactly):
- few-shot: one shared prefix of worked Q/A examples (~1,000 tokens), then 64 distinct questions,
  all in one generate() call; greedy, 16 tokens.
- multi-turn: 8 conversations x 4 turns; turn k resends turn k-1's prompt + reply + a new user
  message. One generate() call per round (every conversation's turn k); greedy, 32 tokens.
- tree: a tree-of-thought-like program: a root prompt and `--depth` levels below it, each node
  with `--branching` children (its prompt + its output + a "step i" message); one generate() call
  per level; temperature 0.7 with a fixed seed per request, 24 tokens.
- multi-prefix (not in the default set): 64 questions behind 4 different ~500-token prefixes,
  arriving interleaved; run with a small `--max-total-tokens` to compare schedule policies when
  not every prefix fits (its optimum assumes an unbounded cache, so it has no hit-rate target).

The optimal hit rate comes from the workload's own tokens: per request, in submission order, the
longest prefix shared with anything cacheable before it (earlier prompts, and prompt + output[:-1]
of requests from earlier generate() calls), capped at len(prompt) - 1, over the sum of prompt
lengths. Targets: few-shot throughput with the cache >= 4x without; measured hit rate >= 95% of
optimal on every workload. Greedy workloads must give the same tokens with the cache on and off.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from machine_info import header
from plotting import Bars, Ceiling, add_plot_flag, check_plot_path, save

from lmprog import LLM, SamplingParams

IM_END = 2  # `<|im_end|>`, SmolLM2's eos
QUICK = {  # --quick: ~8x smaller; applies to the size flags left at their defaults
    "prefix_tokens": 128,
    "num_questions": 8,
    "conversations": 2,
    "turns": 2,
    "chat_max_tokens": 16,
    "depth": 2,
    "branching": 2,
    "tree_max_tokens": 12,
}
SPEEDUP_TARGET, HIT_RATIO_TARGET = 4.0, 0.95

Round = list[tuple[list[int], list[int]]]  # one generate() call: (prompt ids, output ids) each
Generate = Callable[[list[list[int]], list[SamplingParams]], list[list[int]]]


@dataclass
class Result:
    workload: str
    cache: str
    note: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    hit_rate: float = 0.0
    optimal_hit_rate: float = 0.0
    rounds: list[Round] = field(default_factory=list, repr=False)

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.seconds

    @property
    def output_tps(self) -> float:
        return self.generated_tokens / self.seconds


# ---- workloads: each builds its prompts and calls `gen` once per round; returns a note ----------
QUESTION = "Question: Sam has {a} apples and buys {b} more. How many apples does Sam have?\nAnswer:"
TOPICS = ["volcanoes", "the moon", "bees", "rainbows", "glaciers", "owls", "tides", "deserts"]
FOLLOW_UPS = [
    "Why does that happen?",
    "Give me one example.",
    "What is a common myth about it?",
    "Summarize that in one sentence.",
    "What should I read next?",
]


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def chat_prompt(tok: Any, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return encode(tok, tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def extend(tok: Any, prompt: list[int], output: list[int], text: str) -> list[int]:
    """The next prompt: exactly `prompt + output`, closed with <|im_end|>, then a new user turn
    in ChatML, whose special tokens must encode as single ids (checked)."""
    closed = output if output and output[-1] == IM_END else [*output, IM_END]
    turn = encode(tok, f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert turn.count(IM_END) == 1, f"<|im_end|> did not encode as the id {IM_END}: {turn}"
    return prompt + closed + turn


def run_few_shot(gen: Generate, tok: Any, args: argparse.Namespace) -> str:
    rng = random.Random(args.seed)
    text, n_examples = "Answer each question. Show the sum, then the answer.\n\n", 0
    while len(encode(tok, text)) < args.prefix_tokens:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        text += QUESTION.format(a=a, b=b) + f" {a} + {b} = {a + b}. The answer is {a + b}.\n\n"
        n_examples += 1
    prefix = encode(tok, text)
    pairs = rng.sample(
        [(a, b) for a in range(100, 999, 7) for b in range(100, 999, 11)], args.num_questions
    )
    prompts = [prefix + encode(tok, QUESTION.format(a=a, b=b)) for a, b in pairs]
    gen(prompts, [SamplingParams(temperature=0, max_tokens=args.few_shot_max_tokens)])
    return f"shared prefix {len(prefix)} tokens ({n_examples} examples), {len(prompts)} questions"


def run_multi_prefix(gen: Generate, tok: Any, args: argparse.Namespace) -> str:
    """Questions behind `--prefixes` different few-shot prefixes, arriving interleaved; with a
    pool too small for every prefix (`--max-total-tokens`) the schedule policy decides how often
    a prefix is evicted and recomputed."""
    rng = random.Random(args.seed)
    prefixes = []
    for k in range(args.prefixes):
        text = f"Set {k}. Answer each question.\n\n"
        while len(encode(tok, text)) < args.prefix_tokens // 2:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            text += QUESTION.format(a=a, b=b) + f" {a} + {b} = {a + b}.\n\n"
        prefixes.append(encode(tok, text))
    prompts = [
        prefixes[i % args.prefixes] + encode(tok, QUESTION.format(a=100 + i, b=7 * i))
        for i in range(args.num_questions)
    ]
    gen(prompts, [SamplingParams(temperature=0, max_tokens=args.few_shot_max_tokens)])
    sizes = "/".join(str(len(p)) for p in prefixes)
    return f"{args.prefixes} prefixes of {sizes} tokens, {len(prompts)} questions interleaved"


def run_multi_turn(gen: Generate, tok: Any, args: argparse.Namespace) -> str:
    params = [SamplingParams(temperature=0, max_tokens=args.chat_max_tokens)]
    prompts = [
        chat_prompt(tok, f"Conversation {i + 1}: tell me about {TOPICS[i % len(TOPICS)]}.")
        for i in range(args.conversations)
    ]
    for turn in range(args.turns):
        outputs = gen(prompts, params)
        question = FOLLOW_UPS[turn % len(FOLLOW_UPS)]
        prompts = [extend(tok, p, o, question) for p, o in zip(prompts, outputs)]
    return f"{args.conversations} conversations x {args.turns} turns"


def run_tree(gen: Generate, tok: Any, args: argparse.Namespace) -> str:
    level = [
        chat_prompt(
            tok,
            "A farmer has 17 sheep and all but 9 run away. How many are left? "
            "Think one step at a time.",
        )
    ]
    seed = args.seed * 1_000_003  # one fixed seed per request: both engines sample the same tree
    for depth in range(args.depth + 1):
        params = [
            SamplingParams(temperature=0.7, max_tokens=args.tree_max_tokens, seed=seed + i)
            for i in range(len(level))
        ]
        seed += len(level)
        outputs = gen(level, params)
        if depth < args.depth:
            level = [
                extend(tok, p, o, f"Take step {i + 1}: try a different idea.")
                for p, o in zip(level, outputs)
                for i in range(args.branching)
            ]
    return f"depth {args.depth} below the root, branching {args.branching}"


WORKLOADS = {
    "few-shot": run_few_shot,
    "multi-turn": run_multi_turn,
    "tree": run_tree,
    "multi-prefix": run_multi_prefix,
}
DEFAULT_WORKLOADS = "few-shot,multi-turn,tree"
GREEDY = {"few-shot", "multi-turn", "multi-prefix"}


# ---- measurement ------------------------------------------------------------------------------
def optimal_hit_rate(rounds: list[Round]) -> float:
    """Hit rate of an unbounded prefix cache that shares everything it could (module docstring).
    A trie of nested dicts holds every token sequence cacheable so far."""
    trie: dict = {}

    def insert(ids: list[int]) -> None:
        node = trie
        for t in ids:
            node = node.setdefault(t, {})

    def match(ids: list[int]) -> int:
        node, n = trie, 0
        while n < len(ids) and ids[n] in node:
            node, n = node[ids[n]], n + 1
        return n

    hits = total = 0
    for rnd in rounds:
        for prompt, _ in rnd:  # within one call, earlier requests count through their prompts
            # NOTE: the last prompt token is always computed (its logits sample the first output).
            hits += min(match(prompt), len(prompt) - 1)
            total += len(prompt)
            insert(prompt)
        for prompt, output in rnd:  # finished: the last output token's KV is never computed
            insert(prompt + output[:-1])
    return hits / total


def run_workload(llm: LLM, cache: str, name: str, args: argparse.Namespace) -> Result:
    res = Result(name, cache)

    def gen(prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        params = params * len(prompts) if len(params) == 1 else params
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        res.seconds += time.perf_counter() - t0
        res.rounds.append([(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs])
        return [out for _, out in res.rounds[-1]]

    assert llm.reset_prefix_cache(), "reset_prefix_cache() refused: requests still running"
    before = llm.get_cache_stats()
    res.note = WORKLOADS[name](gen, llm.get_tokenizer(), args)
    after = llm.get_cache_stats()
    query = after["query_tokens"] - before["query_tokens"]
    res.hit_rate = (after["hit_tokens"] - before["hit_tokens"]) / max(query, 1)
    res.optimal_hit_rate = optimal_hit_rate(res.rounds)
    res.prompt_tokens = sum(len(p) for rnd in res.rounds for p, _ in rnd)
    res.generated_tokens = sum(len(o) for rnd in res.rounds for _, o in rnd)
    return res


def mismatches(on: Result, off: Result) -> int:
    """Requests whose output ids differ between the runs (a multi-turn mismatch carries over)."""
    return sum(a[1] != b[1] for ra, rb in zip(on.rounds, off.rounds) for a, b in zip(ra, rb))


def print_report(results: dict[str, dict[str, Result]]) -> dict[str, dict[str, Any]]:
    print(
        "| workload | cache | prompt tokens | generated tokens | time (s) | total tok/s "
        "| output tok/s | hit rate | optimal hit rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, by_cache in results.items():
        for r in by_cache.values():
            print(
                f"| {name} | {r.cache} | {r.prompt_tokens} | {r.generated_tokens} "
                f"| {r.seconds:.2f} | {r.total_tps:.1f} | {r.output_tps:.1f} "
                f"| {r.hit_rate:.1%} | {r.optimal_hit_rate:.1%} |"
            )
    print()
    summary = {}
    for name, by_cache in results.items():
        on, off = by_cache["on"], by_cache["off"]
        speedup = on.total_tps / off.total_tps
        ratio = on.hit_rate / on.optimal_hit_rate if on.optimal_hit_rate else 1.0
        ok = (ratio >= HIT_RATIO_TARGET or name == "multi-prefix") and (
            name != "few-shot" or speedup >= SPEEDUP_TARGET
        )
        bad = mismatches(on, off)
        kind = "" if name in GREEDY else " (sampled, not required to match)"
        print(
            f"{name} [{on.note}]: speedup {speedup:.2f}x on/off, measured hit rate {ratio:.1%} "
            f"of optimal, {bad} mismatched outputs{kind} -> {'PASS' if ok else 'FAIL'}"
        )
        summary[name] = {"speedup": speedup, "hit_ratio": ratio, "mismatches": bad, "pass": ok}
    print(
        f"targets: few-shot speedup >= {SPEEDUP_TARGET:.0f}x; measured hit rate >= "
        f"{HIT_RATIO_TARGET:.0%} of optimal on every workload"
    )
    return summary


def plot_report(path: str, results: dict[str, dict[str, Result]], title: str) -> None:
    """print_report's numbers per workload: total tok/s with the cache on and off, the speedup
    (against the few-shot target), and the measured hit rate against the optimal one."""
    names = list(results)
    on = [results[n]["on"] for n in names]
    off = [results[n]["off"] for n in names]
    target = Ceiling(SPEEDUP_TARGET, f"few-shot target {SPEEDUP_TARGET:.0f}x")
    panels = [
        Bars(
            names,
            {"cache on": [r.total_tps for r in on], "cache off": [r.total_tps for r in off]},
            "total tok/s (prompt + generated)",
            title="throughput",
        ),
        Bars(
            names,
            {"speedup": [a.total_tps / b.total_tps for a, b in zip(on, off)]},
            "total tok/s, cache on / off (x)",
            title="speedup of the radix cache",
            ceiling=target if "few-shot" in names else None,
        ),
        Bars(
            names,
            {
                "measured": [100 * r.hit_rate for r in on],
                "optimal": [100 * r.optimal_hit_rate for r in on],
            },
            "prompt tokens found cached (%)",
            title="hit rate, cache on",
        ),
    ]
    save(path, title, panels, ncols=3)


def plot_backends(path: str, table: dict[str, dict[str, Result]], title: str) -> None:
    """compare_backends' table: total tok/s and the speedup over torch_native, per workload."""
    names = list(table)
    labels = list(table[names[0]])
    tps = {label: [table[n][label].total_tps for n in names] for label in labels}
    speedup = {
        label: [table[n]["torch_native"].seconds / table[n][label].seconds for n in names]
        for label in labels
    }
    panels = [
        Bars(names, tps, "total tok/s (prompt + generated)", title="throughput, cache on"),
        Bars(names, speedup, "time of torch_native / time (x)", title="vs torch_native"),
    ]
    save(path, title, panels)


def compare_backends(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, Result]]:
    """The workloads with the cache on, on the cpu attention backend with and without the
    cascade (shared-prefix) kernel and on torch_native, in one process; prints time and speedup.
    Returns {workload: {attention label: result}}."""
    from lmprog.runtime.layers.attention import cpu as cpu_backend

    engines = {
        backend: LLM(
            args.model,
            seed=args.seed,
            attention_backend=backend,
            schedule_policy=args.schedule_policy,
            max_total_tokens=args.max_total_tokens,
        )
        for backend in ("cpu", "torch_native")
    }
    for llm in engines.values():
        llm.generate(["warm up"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    configs = [
        ("cpu, cascade", "cpu", True),
        ("cpu, no cascade", "cpu", False),
        ("torch_native", "torch_native", True),
    ]
    dtype = engines["cpu"].scheduler.model_runner.dtype
    print(f"\nmodel {args.model}, cache on, dtype {dtype}, {header()}")
    print("| workload | attention | time (s) | total tok/s | vs torch_native | same outputs |")
    print("|---|---|---|---|---|---|")
    table = {}
    for name in names:
        rows = table[name] = {}
        for label, backend, cascade in configs:
            cpu_backend.CASCADE = cascade
            rows[label] = run_workload(engines[backend], "on", name, args)
        cpu_backend.CASCADE = True
        base = rows["torch_native"]
        for label, r in rows.items():
            same = "-" if label == "torch_native" else f"{mismatches(r, base) == 0}"
            print(
                f"| {name} | {label} | {r.seconds:.2f} | {r.total_tps:.1f} "
                f"| {base.seconds / r.seconds:.2f}x | {same} |"
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="~8x smaller sizes (a smoke run)")
    parser.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default {DEFAULT_WORKLOADS})",
    )
    parser.add_argument("--schedule-policy", default="fcfs", help="fcfs, lpm or dfs-weight")
    parser.add_argument(
        "--attention-backend",
        default="auto",
        help="auto, cpu or torch_native (LMPROG_CASCADE=0 turns the cpu backend's cascade off)",
    )
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="cache on only: the cpu backend with and without the cascade against torch_native",
    )
    parser.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    add_plot_flag(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--num-questions", type=int, default=64)
    parser.add_argument("--few-shot-max-tokens", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=4, help="multi-prefix: how many")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chat-max-tokens", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3, help="tree levels below the root")
    parser.add_argument("--branching", type=int, default=3)
    parser.add_argument("--tree-max-tokens", type=int, default=24)
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    names = args.workloads.split(",")
    if unknown := sorted(set(names) - set(WORKLOADS)):
        parser.error(f"unknown workloads {unknown}; supported: {', '.join(WORKLOADS)}")
    check_plot_path(args.plot)

    quick = ", --quick" if args.quick else ""
    if args.compare_backends:
        table = compare_backends(names, args)
        if args.plot:
            title = f"attention backends with the radix cache, model {args.model}{quick}"
            plot_backends(args.plot, table, title)
        return
    engines = {}  # one engine per setting, reused across workloads (reset between them)
    for cache in ("on", "off"):
        engines[cache] = LLM(
            args.model,
            seed=args.seed,
            disable_radix_cache=cache == "off",
            schedule_policy=args.schedule_policy,
            max_total_tokens=args.max_total_tokens,
            attention_backend=args.attention_backend,
        )
        engines[cache].generate(
            ["warm up"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
        )
    results = {
        name: {cache: run_workload(llm, cache, name, args) for cache, llm in engines.items()}
        for name in names
    }
    backend = engines["on"].scheduler.model_runner.attention_backend
    print(
        f"\nmodel {args.model}, schedule policy {args.schedule_policy}, "
        f"attention backend {backend}{quick}"
    )
    summary = print_report(results)
    if args.plot:
        title = (
            f"radix cache on vs off, model {args.model}, schedule policy "
            f"{args.schedule_policy}, attention backend {backend}{quick}"
        )
        plot_report(args.plot, results, title)
    if args.json:
        rows = [
            {k: v for k, v in asdict(r).items() if k != "rounds"}
            | {"total_tps": r.total_tps, "output_tps": r.output_tps}
            for by_cache in results.values()
            for r in by_cache.values()
        ]
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
