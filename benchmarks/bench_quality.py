"""Quality of the lossy weight formats: mean log-likelihood per token of a fixed text.

    python benchmarks/bench_quality.py                      # fp32, bf16, int8, gguf
    python benchmarks/bench_quality.py --config fp32=dtype=float32 \
        --config bf16-small-chunks=dtype=bfloat16,chunked_prefill_size=256 --json quality.json

The text is data/quality_text.txt, an essay on lighthouses written for this repository (not model
output, not copied from anywhere; about 2,400 tokens). It goes in as one prompt with the
tokenizer's default special tokens (SmolLM2's adds no BOS), and every token but the first is
scored given those before it (see quality.py).

Each `--config NAME=KEY=VALUE,KEY=VALUE` is one `LLM(**kwargs)`; they load one after another in
this process, each freed before the next. The table gives each one's mean loglik, its difference
from the config named fp32 (relative, in %), perplexity, and the target where NAME has one: bf16
within 1%, int8 within 3%, gguf within 0.5%. The default model is SmolLM2-135M-Instruct from a Q4_1
GGUF, so fp32 here IS that file dequantized to float32: the gguf target (computing from the file's
blocks as they are) measures only the kernels' arithmetic, not the 4-bit rounding, which fp32
already carries. A config that fails to load or run gets its error in the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

from machine_info import header
from quality import TARGETS, relative_difference, score_text

DEFAULT_CONFIGS = [
    "fp32=dtype=float32",
    "bf16=dtype=bfloat16",
    "int8=dtype=float32,quantization=int8",
    "gguf=dtype=float32,quantization=gguf",
]
REFERENCE = "fp32"


def parse_config(spec: str) -> tuple[str, dict[str, Any]]:
    """'bf16=dtype=bfloat16,max_total_tokens=4096' -> ('bf16', {'dtype': 'bfloat16', ...})."""
    name, _, rest = spec.partition("=")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not (name and sep and key):
            raise ValueError(f"--config wants NAME=KEY=VALUE[,KEY=VALUE...], got {spec!r}")
        kwargs[key] = _literal(value)
    return name, kwargs


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def measure(name: str, kwargs: dict[str, Any], model: str, seed: int) -> dict[str, Any]:
    """Loads one config, scores the text, and lets the engine go when it returns."""
    from lmprog import LLM

    row: dict[str, Any] = {"config": name, "kwargs": kwargs}
    t0 = time.perf_counter()
    try:
        llm = LLM(**{"model": model, "seed": seed, **kwargs})
        t1 = time.perf_counter()
        score = score_text(llm)
    except Exception as e:  # noqa: BLE001 (a config that fails is a row, not the end of the run)
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row.update(
        tokens=score.tokens,
        mean_loglik=score.mean_loglik,
        perplexity=score.perplexity,
        load_s=t1 - t0,
        score_s=time.perf_counter() - t1,
    )
    return row


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    reference = next((r for r in rows if r["config"] == REFERENCE and "error" not in r), None)
    for row in rows:
        if "error" in row or reference is None:
            continue
        row["rel_diff"] = relative_difference(row["mean_loglik"], reference["mean_loglik"])
        target = TARGETS.get(row["config"])
        if target is not None:
            row["target"] = target
            row["meets_target"] = abs(row["rel_diff"]) <= target


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| config | tokens | mean loglik | vs fp32 | perplexity | target | load (s) | score (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        diff = f"{100 * r['rel_diff']:+.3f}%" if "rel_diff" in r else "-"
        target = "-"
        if "target" in r:
            verdict = "met" if r["meets_target"] else "MISSED"
            target = f"within {100 * r['target']:g}%: {verdict}"
        print(
            f"| {r['config']} | {r['tokens']} | {r['mean_loglik']:.4f} | {diff} | "
            f"{r['perplexity']:.3f} | {target} | {r['load_s']:.1f} | {r['score_s']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME=KEY=VALUE,...",
        help=f"repeatable; default: {' '.join(DEFAULT_CONFIGS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    configs = [parse_config(c) for c in args.config or DEFAULT_CONFIGS]
    print(f"# bench_quality: {args.model}, {header()}")
    rows = []
    for name, kwargs in configs:
        rows.append(measure(name, kwargs, args.model, args.seed))
        gc.collect()  # the engine of the previous config is unreachable by now
    add_comparisons(rows)
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": header(), "model": args.model, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
