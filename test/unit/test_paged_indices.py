"""FlashInfer's paged-KV index tensors (layers/attention/paged_indices.py): the Triton builder
against the plain-torch reference, run on CPU under TRITON_INTERPRET=1 (in a subprocess: the
interpreter is chosen when Triton is imported), and the reference against a hand-built case."""

from __future__ import annotations

import pytest
import torch
from triton_interpret import run_interpreted

from lmprog.runtime.layers.attention.paged_indices import paged_kv_indices_reference


def paged_rows(lens: list[int], page_size: int, seed: int) -> torch.Tensor:
    """req_to_token rows as the allocator fills them: whole pages, in shuffled page order."""
    gen = torch.Generator().manual_seed(seed)
    pages = [(n + page_size - 1) // page_size for n in lens]
    order = torch.randperm(sum(pages) + 4, generator=gen)[: sum(pages)] + 1  # page 0 reserved
    width = (max(lens, default=0) // page_size + 2) * page_size
    rows = torch.zeros(len(lens) + 2, width, dtype=torch.int64)
    taken = 0
    for b, (n, k) in enumerate(zip(lens, pages)):
        for i in range(n):
            rows[b + 2, i] = order[taken + i // page_size] * page_size + i % page_size
        taken += k
    return rows


def test_reference_on_a_hand_built_case() -> None:
    rows = torch.zeros(3, 8, dtype=torch.int64)
    rows[1, :5] = torch.tensor([8, 9, 10, 11, 4])  # pages 2 and 1 (page_size 4), 1 in the last
    rows[2, :4] = torch.tensor([12, 13, 14, 15])
    indptr, indices, last = paged_kv_indices_reference(
        rows, torch.tensor([1, 2]), torch.tensor([5, 4]), 4
    )
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [2, 1, 3]
    assert last.tolist() == [1, 4] and indices.dtype == torch.int32


CHECK = """
import torch, test_paged_indices as t
from lmprog.runtime.layers.attention.paged_indices import (
    build_paged_kv_indices, paged_kv_indices_reference)
bad = []
for page_size in (1, 4, 16):
    for lens in ([1], [5, 16, 17, 200], [page_size * 3, 1, page_size + 1], []):
        rows = t.paged_rows(lens, page_size, seed=len(lens))
        idx = torch.arange(2, 2 + len(lens))
        seq = torch.tensor(lens, dtype=torch.int64)
        got = build_paged_kv_indices(rows, idx, seq, lens, page_size)
        want = paged_kv_indices_reference(rows, idx, seq, page_size)
        same = all(torch.equal(g, w) for g, w in zip(got, want))
        host = torch.equal(got.indptr_host, want[0]) and torch.equal(got.last_page_len_host, want[2])
        buf = torch.full((got.indices.numel() + 5,), -1, dtype=torch.int32)
        into = build_paged_kv_indices(rows, idx, seq, lens, page_size, indices_out=buf)
        kept = torch.equal(buf[: got.indices.numel()], want[1]) and bool((buf[got.indices.numel():] == -1).all())
        if not (same and host and kept and (not lens or into.indices.data_ptr() == buf.data_ptr())):
            bad.append((page_size, lens))
print("mismatches", bad)
"""


def test_triton_builder_matches_the_reference_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="Triton is not installed")
    assert run_interpreted(CHECK) == "mismatches []"
