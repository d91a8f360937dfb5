"""Hands out KV slots in pages of `page_size` tokens.

A request's tokens fill its pages in order, so the slot of position `pos` is
`page_start + pos % page_size`; a request only asks for a new page when its last page is full:

    page_size = 4, a request with 6 tokens and 3 more coming:
    positions  0 1 2 3 | 4 5 . . |          -> the 2 free slots of the last page take positions 6, 7,
    slots     [8 9 10 11][20 21 22 23]         and a new page takes position 8.

Page 0 (slots [0, page_size)) is the padding page and is never handed out.

The bookkeeping and the slots it returns live on the host: the step that uses them moves them
to the device in its one host-to-device copy (ForwardBatch.build).
"""

from __future__ import annotations

import torch


class TokenToKVPoolAllocator:
    """Free-list of KV pages. `size` usable slots = `size // page_size` pages after page 0."""

    def __init__(self, size: int, page_size: int = 1) -> None:
        assert page_size >= 1 and size >= page_size, (size, page_size)
        self.page_size = page_size
        self.num_pages = size // page_size
        self.size = self.num_pages * page_size
        self.clear()

    def clear(self) -> None:
        # Pages 1..num_pages; popped from the front so slot numbers start low (readable tests).
        self._free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64)

    def available_size(self) -> int:
        return int(self._free_pages.numel()) * self.page_size

    def _take_pages(self, n: int) -> torch.Tensor | None:
        if n > self._free_pages.numel():
            return None
        pages, self._free_pages = self._free_pages[:n], self._free_pages[n:]
        return pages

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Slots for `num_tokens` tokens starting on a fresh page (page_size 1: any slots)."""
        pages = self._take_pages(-(-num_tokens // self.page_size))
        if pages is None:
            return None
        slots = (pages[:, None] * self.page_size + torch.arange(self.page_size)).flatten()
        if num_tokens < slots.numel():
            # NOTE: the tail of the last page stays with this request (it fills it later);
            # the page is freed as a whole when the request frees any slot of it.
            slots = slots[:num_tokens]
        return slots

    def extend_need(self, prefix_lens: list[int], seq_lens: list[int]) -> int:
        """Free slots `alloc_extend` takes for these requests (whole new pages)."""
        p = self.page_size
        return p * sum(-(-s // p) - -(-pre // p) for pre, s in zip(prefix_lens, seq_lens))

    def alloc_extend(
        self, prefix_lens: list[int], seq_lens: list[int], last_locs: list[int]
    ) -> torch.Tensor | None:
        """Slots for positions [prefix_len, seq_len) of each request, concatenated.

        `last_locs[i]` is the slot of position prefix_len-1 of request i (ignored when
        prefix_len is 0). Returns None, allocating nothing, when there is not enough room.
        """
        if self.page_size == 1:
            return self.alloc(sum(s - p for p, s in zip(prefix_lens, seq_lens)))
        p = self.page_size
        pages = self._take_pages(self.extend_need(prefix_lens, seq_lens) // p)
        if pages is None:
            return None
        out: list[torch.Tensor] = []
        next_page = 0
        for pre, s, last in zip(prefix_lens, seq_lens, last_locs):
            # Tail of the partly filled last page first, then whole new pages.
            in_page = min(s, -(-pre // p) * p) - pre
            if in_page > 0:
                out.append(torch.arange(last + 1, last + 1 + in_page, dtype=torch.int64))
            n_new = -(-s // p) - -(-pre // p)
            if n_new:
                mine = pages[next_page : next_page + n_new]
                next_page += n_new
                slots = (mine[:, None] * p + torch.arange(p)).flatten()
                out.append(slots[: s - pre - max(in_page, 0)])
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def free(self, slots: torch.Tensor) -> None:
        """Returns the pages of these slots (a request frees whole pages it owns)."""
        if slots.numel() == 0:
            return
        pages = torch.unique(slots.to("cpu", torch.int64) // self.page_size)
        assert int(pages.min()) >= 1, "freeing the padding page"
        self._free_pages = torch.cat([self._free_pages, pages])

    def free_pages(self) -> torch.Tensor:
        """The free page numbers (a copy)."""
        return self._free_pages.clone()

    def is_free(self, pages: torch.Tensor) -> torch.Tensor:
        """Per page number: whether that page is in the free list."""
        return torch.isin(pages.to("cpu", torch.int64), self._free_pages)

    def check_integrity(self) -> None:
        pages = self._free_pages
        assert pages.numel() == torch.unique(pages).numel(), "a KV page was freed twice"
        assert pages.numel() <= self.num_pages, "more free pages than pages"
