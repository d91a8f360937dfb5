"""FlashInfer's paged-KV index tensors for one step, built from lmprog's `req_to_token` rows.

FlashInfer reads the pool as pages (`k_buffer.view(-1, page_size, kv_heads, head_dim)`, page `p`
holding slots `p * page_size ... p * page_size + page_size - 1`) through three int32 tensors:

    kv_indptr [B + 1]      request b's pages are kv_indices[kv_indptr[b] : kv_indptr[b + 1]]
    kv_indices [pages]     the page ids, in position order
    kv_last_page_len [B]   tokens used in each request's last page (1 .. page_size)

The allocator gives each request whole pages, position `i` in slot `page * page_size + i %
page_size`, so request b's pages are `req_to_token[row, 0 :: page_size] // page_size` for its
`ceil(seq_len / page_size)` pages. `build_paged_kv_indices` fills them on the device with one
small Triton program per request. No host sync: kv_indptr and kv_last_page_len are computed on the
host from the host copy of the lengths the scheduler keeps (FlashInfer's `plan()` wants them
there anyway) and copied over once; `paged_kv_indices_reference` is the same in plain torch, which
tests compare it with on CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # lmprog runs without Triton; only the GPU backends need it
    triton = None


def paged_kv_indices_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indptr, kv_indices, kv_last_page_len), int32, in plain torch (one request at a time)."""
    pages = (seq_lens + page_size - 1) // page_size
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=seq_lens.device)
    indptr[1:] = torch.cumsum(pages, 0)
    parts = [
        req_to_token[row, : int(n) * page_size : page_size] // page_size
        for row, n in zip(req_pool_indices.tolist(), pages.tolist())
    ]
    indices = torch.cat(parts).to(torch.int32) if parts else indptr[:0]
    last = (seq_lens - (pages - 1) * page_size).to(torch.int32)
    return indptr, indices, last


if triton is not None:

    @triton.jit
    def _fill_pages(
        req_to_token,
        req_pool_indices,
        seq_lens,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        row_stride,
        PAGE_SIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        row = tl.load(req_pool_indices + b)
        n = tl.load(seq_lens + b)
        pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
        start = tl.load(kv_indptr + b)
        tl.store(kv_last_page_len + b, (n - (pages - 1) * PAGE_SIZE).to(tl.int32))
        for p0 in range(0, pages, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            mask = p < pages
            slot = tl.load(req_to_token + row * row_stride + p * PAGE_SIZE, mask=mask, other=0)
            tl.store(kv_indices + start + p, (slot // PAGE_SIZE).to(tl.int32), mask=mask)


class PagedKv(NamedTuple):
    """One step's page tables: the three int32 tensors on the device, and the host copies of
    the two that are sized by the batch (what FlashInfer's `plan()` reads without a sync)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    indptr_host: torch.Tensor
    last_page_len_host: torch.Tensor


def host_page_tables(seq_lens_cpu: list[int], page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr, kv_last_page_len) as int32 host tensors, from the host copy of the lengths."""
    pages = [(n + page_size - 1) // page_size for n in seq_lens_cpu]
    indptr = torch.tensor([0, *itertools.accumulate(pages)], dtype=torch.int32)
    last = torch.tensor(
        [n - (p - 1) * page_size for n, p in zip(seq_lens_cpu, pages)], dtype=torch.int32
    )
    return indptr, last


def build_paged_kv_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: list[int],
    page_size: int,
    indices_out: torch.Tensor | None = None,
) -> PagedKv:
    """`paged_kv_indices_reference`'s result (plus the host copies), built by a Triton kernel on
    the tensors' device. `indices_out`, if given, is a preallocated int32 buffer (a CUDA graph's
    static one) whose first `indptr[-1]` entries receive the page ids."""
    assert triton is not None, "build_paged_kv_indices needs Triton"
    dev = seq_lens.device
    indptr_host, last_host = host_page_tables(seq_lens_cpu, page_size)
    total = int(indptr_host[-1])
    if dev.type == "cuda":
        indptr_host, last_host = indptr_host.pin_memory(), last_host.pin_memory()
    indptr = indptr_host.to(dev, non_blocking=True)
    if indices_out is None:
        indices = torch.empty(total, dtype=torch.int32, device=dev)
    else:
        assert indices_out.numel() >= total, f"{total} pages > buffer of {indices_out.numel()}"
        indices = indices_out[:total]
    last = torch.empty(len(seq_lens_cpu), dtype=torch.int32, device=dev)
    if seq_lens_cpu:
        _fill_pages[(len(seq_lens_cpu),)](
            req_to_token,
            req_pool_indices,
            seq_lens,
            indptr,
            indices,
            last,
            req_to_token.stride(0),
            PAGE_SIZE=page_size,
            BLOCK=128,
        )
    return PagedKv(indptr, indices, last, indptr_host, last_host)
