"""Tensor parallelism on CPU (gloo, 2 ranks): the sharded model computes what the whole one does.

The ModelRunner checks drive rank 0's runner the way the scheduler does (request rows, KV slots,
shared prefixes) while rank 1 runs in its own process, and compare every logit row with a
one-rank runner's within 1e-5. The engine checks run the offline LLM at tp 2 and tp 1 through
the prefix cache, chunked prefill, retraction in a tiny pool and forked samples (n > 1),
and ask for the same tokens and logprobs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tp_models import TP_CONFIGS, save_tp_model, words

from lmprog import LLM, SamplingParams
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.model_executor.model_runner import ModelRunner
from lmprog.runtime.server_args import ServerArgs

EXTEND, DECODE = ForwardMode.EXTEND, ForwardMode.DECODE
TOL = 1e-5


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tp_models"))


class Driver:
    """Steps a ModelRunner as the scheduler does: rows, KV slots, teacher-forced tokens."""

    def __init__(self, runner: ModelRunner) -> None:
        self.r = runner
        self.lens: dict[int, int] = {}

    def new(self, shared_from: int | None = None, shared: int = 0) -> int:
        """A request row; with `shared_from`, its first `shared` tokens are that row's KV."""
        row = self.r.req_to_token_pool.alloc()
        assert row is not None
        self.lens[row] = 0
        if shared_from is not None:
            pool = self.r.req_to_token_pool
            pool.write(row, 0, pool.req_to_token[shared_from, :shared].clone())
            self.lens[row] = shared
        return row

    def step(self, mode: ForwardMode, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        rows = [row for row, _ in chunks]
        prefix = [self.lens[row] for row in rows]
        ext = [len(toks) for _, toks in chunks]
        seq = [p + e for p, e in zip(prefix, ext)]
        pool = self.r.req_to_token_pool
        last = [pool.last_slot(row, p) for row, p in zip(rows, prefix)]
        loc = self.r.allocator.alloc_extend(prefix, seq, last)
        assert loc is not None
        pool.write_runs(rows, prefix, ext, loc)
        ids = [t for _, toks in chunks for t in toks]
        fb = ForwardBatch.build(
            mode, ids, rows, prefix, ext, loc, self.r.device, logits_indices=torch.arange(len(ids))
        )
        logits = self.r.forward(fb)
        self.lens.update(zip(rows, seq))
        return logits


def run_script(runner: ModelRunner) -> list[torch.Tensor]:
    """Two prompts prefilled together, four decode steps, then a third request that reuses the
    first one's prefix KV and extends it: every logit row of every step."""
    gen = torch.Generator().manual_seed(7)
    vocab = runner.vocab_size
    a, b = (
        torch.randint(3, vocab, (20,), generator=gen),
        torch.randint(3, vocab, (13,), generator=gen),
    )
    d = Driver(runner)
    ra, rb = d.new(), d.new()
    out = [d.step(EXTEND, [(ra, a.tolist()), (rb, b.tolist())])]
    for i in range(4):
        out.append(d.step(DECODE, [(ra, [5 + i]), (rb, [9 + i])]))
    rc = d.new(shared_from=ra, shared=8)
    out.append(d.step(EXTEND, [(rc, [11, 12, 13, 14, 15]), (rb, [17])]))
    out.append(d.step(DECODE, [(rc, [21]), (ra, [22]), (rb, [23])]))
    return out


@pytest.mark.parametrize("name", TP_CONFIGS)
def test_two_ranks_match_one_rank_logits(name: str, model_root: str) -> None:
    folder = str(save_tp_model(name, model_root))
    args = ServerArgs(model_path=folder, dtype="float32", max_total_tokens=512)
    whole = run_script(ModelRunner(args))
    sharded_runner = ModelRunner(args.replace(tp_size=2))
    try:
        assert sharded_runner.tp.size == 2 and len(sharded_runner.workers) == 1
        sharded = run_script(sharded_runner)
    finally:
        sharded_runner.shutdown()
    assert not sharded_runner.workers
    for step, (x, y) in enumerate(zip(whole, sharded)):
        assert x.shape == y.shape
        diff = float((x - y).abs().max())
        assert diff < TOL, f"{name}: step {step} differs by {diff}"


def test_smollm2_heads_cannot_split_in_two() -> None:
    """9 query heads, 3 KV heads: refused, naming both counts."""
    refusal = r"tensor_parallel_size 2 must divide.*9 query heads and 3 KV heads"
    with pytest.raises(ValueError, match=refusal):
        LLM("smollm2-135m-instruct", tensor_parallel_size=2, dtype="float32")


def test_the_default_model_splits_over_three_ranks(llm: LLM) -> None:
    """SmolLM2-135M (9 query, 3 KV heads) at tp 3, from its GGUF: the same greedy answers as
    the one-rank engine."""
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=1)
    prompts = ["The capital of France is", "Three facts about the moon:"]
    whole = llm.generate(prompts, params, use_tqdm=False)
    split = LLM("smollm2-135m-instruct", tensor_parallel_size=3, dtype="float32", seed=0)
    try:
        assert len(split.scheduler.model_runner.workers) == 2
        same_outputs(whole, split.generate(prompts, params, use_tqdm=False))
    finally:
        split.shutdown()


# ---------------------------------------------------------------- the offline engine at tp 2

ENGINE_ARGS = {
    "dtype": "float32",
    "seed": 0,
    "page_size": 4,
    "chunked_prefill_size": 16,
    "max_total_tokens": 160,  # small: eight long generations cannot all fit, so some retract
    "max_running_requests": 8,
}


@pytest.fixture(scope="module")
def engines(model_root: str) -> Iterator[tuple[LLM, LLM]]:
    folder = str(save_tp_model("llama_kv2_bias", model_root))
    one = LLM(folder, **ENGINE_ARGS)
    two = LLM(folder, tensor_parallel_size=2, **ENGINE_ARGS)
    yield one, two
    for engine in (one, two):
        assert engine.reset_prefix_cache()
        stats = engine.get_kv_stats()
        assert stats["free"] == stats["total"], stats
    two.shutdown()


@pytest.fixture(autouse=True)
def _balanced(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engines" in request.fixturenames:
        for engine in request.getfixturevalue("engines"):
            assert not engine.scheduler.has_work()
            engine.check_integrity()


def same_outputs(one: list, two: list) -> None:
    for a, b in zip(one, two, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            for lx, ly, tok in zip(x.logprobs, y.logprobs, x.token_ids):
                assert abs(lx[tok].logprob - ly[tok].logprob) < 1e-4


GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)


def test_prefix_cache_under_tp2(engines: tuple[LLM, LLM]) -> None:
    """A shared 24-token prefix: the second round reads it from the cache on both engines."""
    prefix = list(range(10, 34))
    prompts = [words(prefix + [40 + i]) for i in range(3)]
    for engine in engines:
        engine.generate(prompts[:1], GREEDY, use_tqdm=False)
    one, two = (engine.generate(prompts, GREEDY, use_tqdm=False) for engine in engines)
    same_outputs(one, two)
    assert all(out.num_cached_tokens >= 20 for out in two)


def test_chunked_prefill_under_tp2(engines: tuple[LLM, LLM]) -> None:
    """A 70-token prompt runs in 16-token chunks."""
    prompt = words([(7 * i) % 150 + 3 for i in range(70)])
    steps = engines[1].scheduler.stats.prefill_steps
    one, two = (engine.generate([prompt], GREEDY, use_tqdm=False) for engine in engines)
    same_outputs(one, two)
    assert engines[1].scheduler.stats.prefill_steps - steps >= 5


def test_retraction_under_tp2(engines: tuple[LLM, LLM]) -> None:
    """Eight 30-token generations in a 160-token pool: decode runs out and retracts."""
    prompts = [words([3 + i, 50 + i, 90 + i, 120 + i]) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=1, ignore_eos=True)
    before = engines[1].scheduler.stats.retracted_requests
    one, two = (engine.generate(prompts, params, use_tqdm=False) for engine in engines)
    same_outputs(one, two)
    assert engines[1].scheduler.stats.retracted_requests > before


def test_forked_samples_under_tp2(engines: tuple[LLM, LLM]) -> None:
    """n = 3 seeded samples fork after the prompt, copying its last partial page (page 4)."""
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=1)
    prompt = [words(list(range(20, 30)))]
    one, two = (engine.generate(prompt, params, use_tqdm=False) for engine in engines)
    same_outputs(one, two)
