"""Embeddings: sentences/s and latency of lmprog's embedder, offline and over HTTP, against HF.

    python benchmarks/bench_embeddings.py                               # 256 sentences, all rows
    python benchmarks/bench_embeddings.py --sentences 16 --latency-queries 5    # a smoke run
    python benchmarks/bench_embeddings.py --skip-http --json embeddings.json

The model is all-MiniLM-L6-v2 (fp32). The dataset is `--sentences` short English sentences of
8-30 words, built from templates over word lists with `--seed`. Nothing is downloaded. One run
measures the following rows:

1. HF transformers: `BertModel` on the same weights, `--hf-batch-size` sentences per forward
   under `torch.inference_mode`, mean-pooled over the attention mask and L2-normalized
   (sentence-transformers' recipe). This is the baseline.
2. lmprog offline: one `LLM.embed(all sentences)` call; the engine does the batching. Its vectors
   are checked against HF's, and the run stops if the max abs difference is over 1e-4.
3. lmprog HTTP, throughput: `--concurrency` client threads, each with its own `requests.Session`,
   POST one sentence per request to `/v1/embeddings` until every sentence is sent. The latency
   columns of this row are per request under that load. The vectors are checked against the
   offline ones with the same tolerance.
4. lmprog HTTP, single-query latency: `--latency-queries` sequential requests of one sentence
   each. p50 and p99 are in ms.

Every timed section follows a few warm-up sentences (`--warmup`), and tokenization is inside the
timing. Load and start times are printed separately. The script starts its own server
(`python -m lmprog.launch_server`) on `--port` (default: a free port), and stops it with SIGTERM,
expecting exit code 0. It does that only after the offline engine is deleted, so on a small CPU
machine the two do not compete for cores. HF and lmprog both use torch's default thread count.

Targets: offline throughput >= HF batched throughput; HTTP single-query p50 < 30 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import requests
import torch
from latency_stats import percentile
from server_process import serve

MODEL = "all-minilm-l6-v2"
MAX_DIFF = 1e-4  # max abs difference allowed between two implementations' vectors
P50_TARGET_MS = 30.0
MIN_WORDS, MAX_WORDS = 8, 30
HF_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

# Word lists by part of speech, one space-separated string each.
ADJECTIVES, NOUNS, VERBS, PREPOSITIONS, ADVERBS, CONJUNCTIONS = (
    words.split()
    for words in (
        "old young quiet busy small large bright dark warm cold tired happy careful clever",
        "farmer teacher child doctor river garden village market window train letter bridge",
        "found painted carried watched opened cleaned visited repaired followed described",
        "near behind beside across under inside past toward",
        "slowly quickly carefully quietly happily early late again",
        "because while after before although",
    )
)
TIMES = ("this morning", "last week", "every summer", "at night", "on Sunday", "in the rain")


@dataclass
class Row:
    path: str
    sentences: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.sentences / self.seconds

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


# ---- dataset ----------------------------------------------------------------------------------
def noun_phrase(rng: random.Random) -> list[str]:
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.6 else []
    return [rng.choice(("the", "a", "my", "our")), *adjective, rng.choice(NOUNS)]


def extension(rng: random.Random) -> list[str]:
    """A phrase that lengthens a sentence: 1-7 words."""
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.choice(PREPOSITIONS), *noun_phrase(rng)]
    if kind == 1:
        return [rng.choice(CONJUNCTIONS), *noun_phrase(rng), rng.choice(VERBS), *noun_phrase(rng)]
    if kind == 2:
        return ["and", rng.choice(VERBS), *noun_phrase(rng)]
    return [rng.choice(ADVERBS)] if rng.random() < 0.5 else rng.choice(TIMES).split()


def sentence(rng: random.Random) -> str:
    target = rng.randint(MIN_WORDS, MAX_WORDS)
    words = [*noun_phrase(rng), rng.choice(VERBS), *noun_phrase(rng)]  # 5-7 words
    while len(words) < target:
        more = extension(rng)
        if len(words) + len(more) > MAX_WORDS:
            break  # only near MAX_WORDS: an extension has at most 7 words
        words += more
    assert MIN_WORDS <= len(words) <= MAX_WORDS, f"{len(words)} words: {words}"
    text = " ".join(words)
    return f"{text[0].upper()}{text[1:]}."


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"vector shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def check_close(what: str, diff: float) -> None:
    print(f"{what}: max abs diff {diff:.2e} (limit {MAX_DIFF:.0e})")
    if not diff <= MAX_DIFF:  # also catches nan
        sys.exit(f"FAIL: {what} differ by {diff:.2e} > {MAX_DIFF:.0e}; rows are not comparable")


# ---- 1. HF transformers -----------------------------------------------------------------------
def run_hf(args: argparse.Namespace, texts: list[str], warm: list[str]) -> tuple[Row, torch.Tensor]:
    import transformers

    from lmprog.runtime.model_loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, torch.float32)
    model = transformers.BertModel(loaded.config, add_pooling_layer=False).eval()
    missing, _ = model.load_state_dict(dict(loaded.weights()), strict=False)
    assert not missing, f"HF BertModel found no weights for {missing}"
    print(f"HF load: {time.perf_counter() - t0:.2f} s")

    def encode(batch: list[str]) -> torch.Tensor:
        enc = loaded.tokenizer(
            batch, padding=True, truncation=True, max_length=HF_MAX_LENGTH, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    bs = args.hf_batch_size
    with torch.inference_mode():
        encode(warm)
        t0 = time.perf_counter()
        vectors = torch.cat([encode(texts[i : i + bs]) for i in range(0, len(texts), bs)])
        seconds = time.perf_counter() - t0
    return Row(f"HF transformers (batch {bs})", len(texts), seconds), vectors


# ---- 2. lmprog offline ------------------------------------------------------------------------
def run_offline(
    args: argparse.Namespace, texts: list[str], warm: list[str]
) -> tuple[Row, torch.Tensor]:
    from lmprog import LLM

    t0 = time.perf_counter()
    llm = LLM(model=args.model)
    print(f"lmprog LLM load: {time.perf_counter() - t0:.2f} s")
    llm.embed(warm, use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False)
    seconds = time.perf_counter() - t0
    vectors = torch.tensor([o.outputs.embedding for o in outputs])
    # Free the engine's threads and memory before the server starts: they share the cores.
    del llm, outputs
    gc.collect()
    return Row("lmprog LLM.embed (one call)", len(texts), seconds), vectors


# ---- 3 and 4. lmprog over HTTP ----------------------------------------------------------------
@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The embedding server (server_process.serve); yields its base URL."""
    with serve(["--model-path", args.model], args.server_timeout, "embeddings", args.port) as url:
        yield url


def embed_one(session: requests.Session, url: str, model: str, text: str) -> list[float]:
    body = {"model": model, "input": text, "encoding_format": "float"}
    resp = session.post(url, json=body, timeout=(10, 600))
    if resp.status_code != 200:
        raise RuntimeError(f"POST {url}: HTTP {resp.status_code}: {resp.text[:300]}")
    data = resp.json()["data"]
    assert len(data) == 1, f"one input gave {len(data)} embeddings"
    return data[0]["embedding"]


def concurrent_load(
    url: str, model: str, texts: list[str], concurrency: int
) -> tuple[float, list[float], list[list[float]]]:
    """`concurrency` threads take sentences from one queue until it is empty; each request
    carries one sentence. Returns wall seconds, per-request latencies (ms), vectors in order."""
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(texts)):
        jobs.put(i)
    latencies, vectors = [math.nan] * len(texts), [[] for _ in texts]
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while not errors:
                try:
                    i = jobs.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    vectors[i] = embed_one(session, url, model, texts[i])
                except (requests.RequestException, RuntimeError, ValueError, KeyError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                latencies[i] = (time.perf_counter() - t0) * 1e3

    threads = [threading.Thread(target=client) for _ in range(min(concurrency, len(texts)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, the first: {errors[0]}")
    return seconds, latencies, vectors


def sequential_latency(url: str, model: str, texts: list[str]) -> tuple[float, list[float]]:
    latencies = []
    with requests.Session() as session:
        t_start = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            embed_one(session, url, model, text)
            latencies.append((time.perf_counter() - t0) * 1e3)
        return time.perf_counter() - t_start, latencies


def run_http(
    args: argparse.Namespace, texts: list[str], warm: list[str]
) -> tuple[list[Row], torch.Tensor]:
    queries = [texts[i % len(texts)] for i in range(args.latency_queries)]
    with server(args) as base_url:
        url = f"{base_url}/v1/embeddings"
        concurrent_load(url, args.model, warm, args.concurrency)
        seconds, latencies, vectors = concurrent_load(url, args.model, texts, args.concurrency)
        load = Row(f"lmprog HTTP, {args.concurrency} concurrent", len(texts), seconds, latencies)
        sequential_latency(url, args.model, warm)
        seconds, latencies = sequential_latency(url, args.model, queries)
        single = Row("lmprog HTTP, sequential single queries", len(queries), seconds, latencies)
    return [load, single], torch.tensor(vectors)


# ---- report -----------------------------------------------------------------------------------
def print_table(rows: list[Row], hf: Row | None) -> None:
    print("| path | sentences | time (s) | sentences/s | vs HF | latency p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_hf = f"{r.rate / hf.rate:.2f}x" if hf else "-"
        p50, p99 = (f"{r.p50:.1f}", f"{r.p99:.1f}") if r.latencies_ms else ("-", "-")
        print(
            f"| {r.path} | {r.sentences} | {r.seconds:.3f} | {r.rate:.1f} | {vs_hf} "
            f"| {p50} | {p99} |"
        )


def verdicts(offline: Row, hf: Row | None, single: Row | None) -> str:
    if hf:
        ok = offline.rate >= hf.rate
        throughput = (
            f"offline {offline.rate:.1f} vs HF batched {hf.rate:.1f} sentences/s "
            f"({offline.rate / hf.rate:.2f}x, target >= 1x) -> {'PASS' if ok else 'FAIL'}"
        )
    else:
        throughput = "offline vs HF: not measured (--skip-hf)"
    if single:
        ok = single.p50 < P50_TARGET_MS
        latency = (
            f"HTTP single-query p50 {single.p50:.1f} ms (target < {P50_TARGET_MS:.0f} ms) "
            f"-> {'PASS' if ok else 'FAIL'}"
        )
    else:
        latency = "HTTP single-query p50: not measured (--skip-http)"
    return f"targets: {throughput}; {latency}"


def finite(x: float) -> float | None:
    """nan as null, so the JSON file is strict JSON."""
    return x if math.isfinite(x) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="an encoder (embedding) model")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP client threads")
    parser.add_argument("--latency-queries", type=int, default=50, help="sequential requests")
    parser.add_argument("--warmup", type=int, default=4, help="sentences before each section")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--server-timeout", type=float, default=300, help="s to wait for it")
    parser.add_argument("--skip-hf", action="store_true", help="no HF baseline (nor its check)")
    parser.add_argument("--skip-http", action="store_true", help="no server rows")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    args = parser.parse_args()
    for name in ("sentences", "hf_batch_size", "concurrency", "latency_queries", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    texts = sentences(args.sentences, args.seed)
    warm = sentences(args.warmup, args.seed + 1)  # not the measured sentences
    n_words = [len(t.split()) for t in texts]
    print(
        f"model {args.model}: {len(texts)} sentences of {min(n_words)}-{max(n_words)} words "
        f"(mean {sum(n_words) / len(n_words):.1f}), seed {args.seed}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    hf, hf_vectors = run_hf(args, texts, warm) if not args.skip_hf else (None, None)
    offline, offline_vectors = run_offline(args, texts, warm)
    if hf_vectors is not None:
        check_close("lmprog offline vs HF vectors", max_abs_diff(offline_vectors, hf_vectors))
    rows = [r for r in (hf, offline) if r]
    single = None
    if not args.skip_http:
        http_rows, http_vectors = run_http(args, texts, warm)
        check_close("lmprog HTTP vs offline vectors", max_abs_diff(http_vectors, offline_vectors))
        rows += http_rows
        single = http_rows[-1]

    print()
    print_table(rows, hf)
    print(verdicts(offline, hf, single))
    if args.json:
        results = [
            asdict(r)
            | {"sentences_per_s": r.rate, "p50_ms": finite(r.p50), "p99_ms": finite(r.p99)}
            for r in rows
        ]
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
