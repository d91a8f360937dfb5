"""FlashInfer's paged-KV index tensors for one step, built from lmprog's `req_to_token` rows.

FlashInfer reads the pool as pages (`k_buffer.view(-1, page_size, kv_heads, head_dim)`, page `p`
holding slots `p * page_size ... p * page_size + page_size - 1`) through three int32 tensors:

    kv_indptr [B + 1]      request b's pages are kv_indices[kv_indptr[b] : kv_indptr[b + 1]]
    kv_indices [pages]     the page ids, in position order
    kv_last_page_len [B]   tokens used in each request's last page (1 .. page_size)

The allocator gives each request whole pages, position `i` in slot `page * page_size + i %
page_size`, so request b's pages are `req_to_token[row, 0 :: page_size] // page_size` for its
`ceil(seq_len / page_size)` pages. `build_paged_kv_indices` fills them on the device with one
small Triton program per request (no host sync: the total page count comes from the host copy of
the lengths the scheduler keeps); `paged_kv_indices_reference` is the same in plain torch, which
tests compare it with on CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # lmprog runs without Triton; only the GPU backends need it
    triton = None


def _pages_and_indptr(seq_lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages per request and their int32 prefix sums (kv_indptr), on seq_lens' device."""
    pages = (seq_lens + page_size - 1) // page_size
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=seq_lens.device)
    indptr[1:] = torch.cumsum(pages, 0)
    return pages, indptr


def paged_kv_indices_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indptr, kv_indices, kv_last_page_len), int32, in plain torch (one request at a time)."""
    pages, indptr = _pages_and_indptr(seq_lens, page_size)
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


def build_paged_kv_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: list[int],
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`paged_kv_indices_reference`'s result, built by a Triton kernel on the tensors' device."""
    assert triton is not None, "build_paged_kv_indices needs Triton"
    dev = seq_lens.device
    total = sum((n + page_size - 1) // page_size for n in seq_lens_cpu)  # no device sync
    _, indptr = _pages_and_indptr(seq_lens, page_size)
    indices = torch.empty(total, dtype=torch.int32, device=dev)
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
    return indptr, indices, last
