"""Cascade (shared-prefix) decode attention: the kernel against plain decode and the float64
reference on every ISA path, the backend's grouping against a brute-force one, and the engine's
greedy answers with the cascade against the torch backend's.

As in test_sgl_kernel_cpu.py, the lower ISA paths run this file as a script in a subprocess.
"""

from __future__ import annotations

import random

import pytest
import torch

from lmprog import SamplingParams
from lmprog.runtime.layers.attention import cpu as cpu_backend
from lmprog.runtime.layers.attention.shared_prefix import SharedPrefixes, find_shared_prefixes

sgl_kernel = pytest.importorskip("sgl_kernel", reason="sgl_kernel is not built (scripts/setup.sh)")

# This file's folder is on sys.path, under pytest and as a script.
from test_sgl_kernel_cpu import TOL, attention_ref, run_on_isa


# ---- inputs --------------------------------------------------------------------------------
def shared_prefix_batch(
    prefixes: list[int],
    suffixes: list[list[int]],
    alone: list[int],
    kv_heads: int,
    d: int,
    page: int,
    dtype: torch.dtype,
    seed: int,
):
    """A pool where group g's members share one run of P_g slots, then own fresh slots.

    Slots come in shuffled pages; the batch order interleaves groups and ungrouped (`alone`)
    requests, and each request sits at a random row of req_to_token.
    Returns (k_buf, v_buf, req_to_token, rows, seq_lens, group_of, prefix_lens, slots).
    """
    g = torch.Generator().manual_seed(seed)
    lens = [n for p, own in zip(prefixes, suffixes) for n in [p] + own] + alone
    pages = sum(-(-n // page) for n in lens) + 2
    free = (torch.randperm(pages - 1, generator=g) + 1)[:, None] * page + torch.arange(page)
    free = free.flatten().tolist()  # page 0 is padding

    def take(n: int) -> torch.Tensor:
        used = -(-n // page) * page  # whole pages, as the allocator hands them out
        out = torch.tensor(free[:n])
        del free[:used]
        return out

    requests = []  # (group, slots)
    for grp, (p, own) in enumerate(zip(prefixes, suffixes)):
        shared = take(p)
        requests += [(grp, torch.cat([shared, take(n)])) for n in own]
    requests += [(-1, take(n)) for n in alone]
    random.Random(seed).shuffle(requests)
    k_buf = torch.randn(pages * page, kv_heads, d, generator=g).to(dtype)
    v_buf = torch.randn(pages * page, kv_heads, d, generator=g).to(dtype)
    width = max(len(s) for _, s in requests) + 3
    req_to_token = torch.zeros(len(requests) + 3, width, dtype=torch.int64)
    rows = torch.randperm(len(requests) + 3, generator=g)[: len(requests)]
    for row, (_, s) in zip(rows, requests):
        req_to_token[row, : len(s)] = s
    seq_lens = torch.tensor([len(s) for _, s in requests])
    group_of = torch.tensor([grp for grp, _ in requests])
    slots = [s for _, s in requests]
    return k_buf, v_buf, req_to_token, rows, seq_lens, group_of, torch.tensor(prefixes), slots


CASCADE_CASES = [
    # (prefix per group, own lengths of its members, ungrouped lengths, heads, kv_heads, d, page)
    ([1, 15], [[1, 5], [1, 40, 2]], [3, 70], 4, 4, 64, 1),
    ([16, 17], [[1, 1, 1], [100, 1]], [1], 9, 3, 64, 16),
    ([1000], [[1, 300, 1, 16]], [20], 8, 1, 128, 16),
    ([17, 1000], [[2, 1], [1, 65, 1]], [1000], 24, 3, 128, 1),
    ([40], [[1] * 20], [], 6, 2, 128, 4),  # 60 query rows in one group: full register tiles
    ([33], [[1, 9]], [5], 6, 3, 72, 1),  # head dim 72: the AVX2 width, not AVX-512's
    ([20], [[3, 1]], [7], 6, 3, 36, 1),  # head dim 36: scalar only
]


def check_cascade(dtype: torch.dtype) -> None:
    for i, (prefixes, suffixes, alone, heads, kv_heads, d, page) in enumerate(CASCADE_CASES):
        batch = shared_prefix_batch(prefixes, suffixes, alone, kv_heads, d, page, dtype, i)
        k_buf, v_buf, r2t, rows, seq_lens, group_of, prefix_lens, slots = batch
        q = torch.randn(len(slots), heads, d).to(dtype)
        scale = d**-0.5
        out = torch.empty_like(q)
        sgl_kernel.cascade_decode_attention(
            q, k_buf, v_buf, out, r2t, rows, seq_lens, group_of, prefix_lens, scale
        )
        plain = torch.empty_like(q)
        sgl_kernel.decode_attention(q, k_buf, v_buf, plain, r2t, rows, seq_lens, scale)
        ref = attention_ref(q, k_buf, v_buf, slots, [len(s) - 1 for s in slots], scale)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(out, plain, atol=TOL[dtype], rtol=TOL[dtype])


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_matches_plain_decode_and_the_reference(dtype) -> None:
    check_cascade(dtype)


def test_cascade_refuses_groups_the_batch_cannot_have() -> None:
    k_buf, v_buf, r2t, rows, seq_lens, group_of, _, _ = shared_prefix_batch(
        [8], [[1, 2]], [4], 2, 64, 1, torch.float32, 0
    )
    q = torch.randn(3, 2, 64)
    out = torch.empty_like(q)
    args = (q, k_buf, v_buf, out, r2t, rows, seq_lens)
    with pytest.raises(RuntimeError, match="is not shorter than request"):
        sgl_kernel.cascade_decode_attention(*args, group_of, torch.tensor([9]), 0.125)
    with pytest.raises(RuntimeError, match="groups are -1"):
        sgl_kernel.cascade_decode_attention(*args, group_of + 1, torch.tensor([8]), 0.125)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_paths(isa: str) -> None:
    run_on_isa(__file__, isa)


# ---- grouping --------------------------------------------------------------------------------
def brute_force_groups(
    r2t: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, min_prefix: int
) -> dict[tuple[int, ...], int]:
    """{members: shared prefix} by the definition, one request at a time."""
    by_first: dict[int, list[int]] = {}
    for b, row in enumerate(rows.tolist()):
        by_first.setdefault(int(r2t[row, 0]), []).append(b)
    found = {}
    for members in by_first.values():
        if len(members) < 2:
            continue
        lead = r2t[rows[members[0]]].tolist()
        shared = min(int(seq_lens[b]) for b in members) - 1
        for b in members[1:]:
            mine = r2t[rows[b]].tolist()
            n = 0
            while n < shared and mine[n] == lead[n]:
                n += 1
            shared = n
        if shared >= min_prefix:
            found[tuple(members)] = shared
    return found


def radix_like_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Requests whose rows follow random paths of a prefix tree of slot runs (as the radix
    cache hands them out: sharing a slot at a position means sharing every slot before it),
    then own a few fresh slots; rows sit at random rows of req_to_token."""
    rng = random.Random(seed)
    fresh = iter(range(1, 10**6))
    tree: list[list[int]] = [[]]  # paths so far
    paths = []
    for _ in range(rng.randint(1, 40)):
        base = rng.choice(tree)
        # Continue an earlier path (a next turn), or share a part of it, or nothing.
        cut = len(base) if rng.random() < 0.5 else rng.randint(0, len(base))
        path = base[:cut] + [next(fresh) for _ in range(rng.choice([1, 5, 60, 70, 200]))]
        tree.append(path)
        paths.append(path)
    width = max(map(len, paths)) + 2
    r2t = torch.zeros(len(paths) + 5, width, dtype=torch.int64)
    rows = torch.randperm(len(paths) + 5, generator=torch.Generator().manual_seed(seed))
    rows = rows[: len(paths)]
    lens = []
    for row, path in zip(rows, paths):
        r2t[row, : len(path)] = torch.tensor(path)
        # Mostly the whole path; sometimes shorter, which caps what the request may share.
        lens.append(len(path) if rng.random() < 0.7 else rng.randint(1, len(path)))
    return r2t, rows, torch.tensor(lens)


@pytest.mark.parametrize("seed", range(30))
def test_grouping_matches_a_brute_force_one(seed: int) -> None:
    r2t, rows, seq_lens = radix_like_batch(seed)
    for min_prefix in (1, 16, 64):
        groups = find_shared_prefixes(r2t, rows, seq_lens, min_prefix)
        expected = brute_force_groups(r2t, rows, seq_lens, min_prefix)
        if groups is None:
            assert expected == {}
            continue
        got: dict[int, list[int]] = {}
        for b, g in enumerate(groups.group_of.tolist()):
            if g >= 0:
                got.setdefault(g, []).append(b)
        assert sorted(got) == list(range(groups.prefix_lens.numel()))
        assert {tuple(m): int(groups.prefix_lens[g]) for g, m in got.items()} == expected


def test_grouping_skips_single_requests_and_distinct_prefixes() -> None:
    r2t = torch.arange(1, 41).view(4, 10)
    assert find_shared_prefixes(r2t, torch.tensor([2]), torch.tensor([10]), 1) is None
    assert find_shared_prefixes(r2t, torch.arange(4), torch.full((4,), 10), 1) is None


# ---- the engine ------------------------------------------------------------------------------
FEW_SHOT = "Answer each question.\n\n" + "".join(
    f"Question: Sam has {a} apples and buys {b} more. How many now?\nAnswer: {a + b}.\n\n"
    for a, b in [(12, 7), (30, 45), (8, 81), (56, 13), (22, 22), (67, 19), (40, 9), (15, 60)]
)


def test_engine_answers_match_the_torch_backend(llm, engine_factory, monkeypatch) -> None:
    """A few-shot batch decodes through the cascade (its prefix is shared through the radix
    cache) and gives the torch backend's greedy answers, token for token. The decode steps run
    the layers in C++ (DecodeStack), which takes the step's groups from the backend."""
    if llm.scheduler.model_runner.attention_backend != "cpu":
        pytest.skip("the default engine does not run the cpu attention backend")
    calls = []

    def recorded(*args: object) -> SharedPrefixes | None:
        groups = find_shared_prefixes(*args)
        if groups is not None:
            calls.append(groups.prefix_lens)
        return groups

    monkeypatch.setattr(cpu_backend, "find_shared_prefixes", recorded)
    prompts = [
        f"{FEW_SHOT}Question: Sam has {a} apples and buys {a + 3} more. How many now?\nAnswer:"
        for a in (101, 230, 347, 512, 689, 777)
    ]
    params = SamplingParams(temperature=0, max_tokens=8)
    assert llm.reset_prefix_cache()
    got = llm.generate(prompts, params, use_tqdm=False)
    assert calls and all(int(p.min()) > 200 for p in calls), "the cascade did not run"
    torch_backend = engine_factory(seed=0, attention_backend="torch_native")
    expected = torch_backend.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        check_cascade(dtype)
    print(f"{sgl_kernel.cpu_isa()} ok")
