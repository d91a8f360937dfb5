"""Structured generation: JSON-schema outputs against unconstrained outputs of the same length.

    python benchmarks/bench_structured.py              # 32 requests
    python benchmarks/bench_structured.py --quick      # 8 requests: a smoke run

One batch of `--num-requests` chat requests asks for a person described as JSON. Three runs, each
one generate() call over the whole batch after a warm-up (so grammar compilation, which is cached
per schema, is timed separately):

- unconstrained: the same prompts with `ignore_eos` and, per request, max_tokens = the token count
  of that request's constrained output, so both runs produce the same number of tokens;
- json_schema with jump-forward (the default);
- json_schema without jump-forward (an engine started with disable_jump_forward=True).

Greedy decoding makes the constrained runs deterministic. Every constrained output must parse and
validate against the schema. Targets: the constraint costs at most 20% of the unconstrained
throughput; with jump-forward there are fewer decode steps than generated tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from lmprog import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "occupation": {"type": "string", "maxLength": 24},
        "hobbies": {
            "type": "array",
            "items": {"enum": ["reading", "chess", "hiking", "cooking", "music"]},
            "maxItems": 3,
        },
        "married": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "occupation", "hobbies", "married"],
}
COST_TARGET = 0.20
TOPICS = [
    "a teacher",
    "a sailor",
    "a chef",
    "a pilot",
    "a painter",
    "a nurse",
    "a farmer",
    "a poet",
]


def prompts(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Invent {TOPICS[i % len(TOPICS)]} number {i} as JSON."}]
        for i in range(n)
    ]


def timed(llm: LLM, convs: list, params: list[SamplingParams]) -> tuple[float, list, dict]:
    stats = llm.scheduler.stats
    before = (stats.decode_steps, stats.jump_forward_tokens)
    start = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    counters = {
        "decode_steps": stats.decode_steps - before[0],
        "jump_forward_tokens": stats.jump_forward_tokens - before[1],
    }
    return seconds, [o.outputs[0] for o in outs], counters


def constrained_run(llm: LLM, convs: list, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, json_schema=SCHEMA)
    start = time.perf_counter()
    llm.scheduler.check_grammar(params)  # compiled once per engine, then cached
    compile_s = time.perf_counter() - start
    llm.chat(convs[:2], params, use_tqdm=False)  # warm-up
    seconds, outs, counters = timed(llm, convs, [params] * len(convs))
    for out in outs:
        if out.finish_reason != "stop":
            raise SystemExit(f"FAIL: an output did not complete its JSON: {out.text!r}")
        jsonschema.validate(json.loads(out.text), SCHEMA)
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "lengths": [len(o.token_ids) for o in outs],
        "compile_s": compile_s,
        **counters,
    }


def unconstrained_run(llm: LLM, convs: list, lengths: list[int]) -> dict:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    llm.chat(convs[:2], params[:2], use_tqdm=False)  # warm-up
    seconds, outs, counters = timed(llm, convs, params)
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(lengths), (tokens, sum(lengths))
    return {"seconds": seconds, "tokens": tokens, "compile_s": 0.0, **counters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--quick", action="store_true", help="8 requests: a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n = 8 if args.quick else args.num_requests
    convs = prompts(n)
    engine_args = {"seed": 0, "max_total_tokens": 16384}

    llm = LLM(**engine_args)
    with_jf = constrained_run(llm, convs, args.max_tokens)
    plain = unconstrained_run(llm, convs, with_jf["lengths"])
    del llm
    no_jf_llm = LLM(disable_jump_forward=True, **engine_args)
    without_jf = constrained_run(no_jf_llm, convs, args.max_tokens)
    del no_jf_llm

    rows = [
        ("unconstrained, same lengths", plain),
        ("json_schema, jump-forward", with_jf),
        ("json_schema, no jump-forward", without_jf),
    ]
    base = plain["tokens"] / plain["seconds"]
    print(f"{n} requests, SmolLM2-135M fp32, greedy; schema with {len(SCHEMA['properties'])} keys")
    print()
    print(
        "| run | output tokens | time (s) | tok/s | vs unconstrained | decode steps "
        "| jump-forward tokens | grammar compile (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        print(
            f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {rate:.1f} | {rate / base:.2f}x "
            f"| {r['decode_steps']} | {r['jump_forward_tokens']} | {r['compile_s']:.3f} |"
        )
    cost = 1 - (with_jf["tokens"] / with_jf["seconds"]) / base
    # Without jump-forward a batch needs (its longest output - 1) decode steps.
    longest = max(with_jf["lengths"])
    fewer = with_jf["decode_steps"] < longest - 1
    print()
    print(
        f"constraint cost with jump-forward: {cost:.0%} of throughput (target <= "
        f"{COST_TARGET:.0%}) -> {'PASS' if cost <= COST_TARGET else 'FAIL'}; decode steps "
        f"{with_jf['decode_steps']} for a longest output of {longest} tokens "
        f"(without jump-forward: {without_jf['decode_steps']}) -> {'PASS' if fewer else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows), f, indent=1)


if __name__ == "__main__":
    main()
