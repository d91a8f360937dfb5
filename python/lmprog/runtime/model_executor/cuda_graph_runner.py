"""CUDA graphs for decode steps: one capture per batch-size bucket, replayed with the step's inputs.

A decode step of a small model is a few hundred short kernel launches; on a GPU the launches, not
the math, set its time. Capturing the model's forward once per batch size and replaying it costs
one launch. What that takes:

- buckets: batch sizes 1, 2, 4, 8 and then every 8 up to `--cuda-graph-max-bs`; a step of B
  requests runs the smallest bucket >= B, its extra rows padding;
- static inputs (`DecodeGraphInputs`): the step's tensors are copied into fixed buffers the graph
  was captured on; padding rows decode token 0 at position 0 of the request pool's padding row
  (all zeros, so they read KV slot 0 of the reserved page 0) and write their K/V to slot 0, so
  they touch no live data. Their logits are computed and dropped;
- the attention backend's metadata is rebuilt outside the graph before each replay
  (`init_forward_metadata_graph`: FlashInfer re-plans into static index buffers), and only
  backends whose decode reads nothing but device tensors can be captured (`supports_cuda_graph`);
- nothing inside the captured region may sync with the host or allocate from the host: the rotary
  table is grown to the whole context before capture, so `ensure` never grows it in a replay.

`use_graphs=False` runs the same padded static batches eagerly: how the padding and buffer logic
is checked on machines without a GPU (test/unit/test_cuda_graph_runner.py).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from lmprog.runtime.layers.rotary import RotaryEmbedding
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from lmprog.runtime.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, then every 8 up to max_bs, and max_bs itself."""
    assert max_bs >= 1, f"cuda_graph_max_bs {max_bs} must be >= 1"
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def bucket_for(batch_size: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `batch_size` rows; None when none does."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphInputs:
    """The fixed buffers a captured decode step reads, for up to `max_bs` requests."""

    def __init__(self, max_bs: int, padding_row: int, device: torch.device) -> None:
        def filled(value: int) -> torch.Tensor:
            return torch.full((max_bs,), value, dtype=torch.int64, device=device)

        self.max_bs = max_bs
        self.padding_row = padding_row
        self.input_ids = filled(0)
        self.positions = filled(0)
        self.req_pool_indices = filled(padding_row)
        self.seq_lens = filled(1)
        self.prefix_lens = filled(0)
        self.extend_lens = filled(1)  # decode: one new token per request, never rewritten
        self.out_cache_loc = filled(0)

    def load(self, fb: ForwardBatch | None, bs: int) -> ForwardBatch:
        """A decode batch of `bs` rows over the buffers: `fb`'s requests first (None: none, as
        when capturing), then padding rows."""
        n = 0 if fb is None else fb.batch_size
        assert n <= bs <= self.max_bs, f"{n} requests in a bucket of {bs} (max {self.max_bs})"
        pairs = (
            (self.input_ids, None if fb is None else fb.input_ids, 0),
            (self.positions, None if fb is None else fb.positions, 0),
            (self.req_pool_indices, None if fb is None else fb.req_pool_indices, self.padding_row),
            (self.seq_lens, None if fb is None else fb.seq_lens, 1),
            (self.prefix_lens, None if fb is None else fb.extend_prefix_lens, 0),
            (self.out_cache_loc, None if fb is None else fb.out_cache_loc, 0),
        )
        for static, real, pad in pairs:
            if n:
                static[:n].copy_(real, non_blocking=True)
            if n < bs:
                static[n:bs].fill_(pad)
        seq_lens_cpu = ([] if fb is None else list(fb.seq_lens_cpu)) + [1] * (bs - n)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_prefix_lens=self.prefix_lens[:bs],
            extend_seq_lens=self.extend_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=seq_lens_cpu,
            extend_prefix_lens_cpu=[s - 1 for s in seq_lens_cpu],
            extend_seq_lens_cpu=[1] * bs,
        )


class CudaGraphRunner:
    """Runs decode steps of up to `max_bs` requests through graphs captured at start-up."""

    def __init__(self, runner: ModelRunner, max_bs: int, use_graphs: bool = True) -> None:
        self.runner = runner
        self.use_graphs = use_graphs
        self.sizes = graph_batch_sizes(max_bs)
        rows = runner.req_to_token_pool
        self.inputs = DecodeGraphInputs(max_bs, rows.padding_row, runner.device)
        page = runner.server_args.page_size
        max_pages = max_bs * -(-runner.context_len // page)
        runner.attn_backend.init_cuda_graph_state(max_bs, max_pages)
        for module in runner.model.modules():
            if isinstance(module, RotaryEmbedding):
                module.ensure(runner.context_len + 1)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if use_graphs:
            t0 = time.perf_counter()
            self._capture_all()
            logger.info(
                "CUDA graphs: %d decode batch sizes up to %d captured in %.1fs",
                len(self.sizes),
                self.sizes[-1],
                time.perf_counter() - t0,
            )

    @property
    def max_bs(self) -> int:
        return self.sizes[-1]

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            fb.forward_mode.is_decode
            and 0 < fb.batch_size <= self.max_bs
            and fb.logits_indices is None
        )

    def _static_batch(self, fb: ForwardBatch | None, bs: int) -> ForwardBatch:
        """`fb` loaded into the static buffers, padded to `bs`, planned by the backend."""
        runner = self.runner
        static = self.inputs.load(fb, bs)
        static.req_to_token_pool = runner.req_to_token_pool
        static.token_to_kv_pool = runner.token_to_kv_pool
        static.attn_backend = runner.attn_backend
        runner.attn_backend.init_forward_metadata_graph(static)
        return static

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            fb = self._static_batch(None, bs)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles Triton/FlashInfer kernels, settles allocations
                    self.runner.model(fb)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self.runner.model(fb)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """The step's float32 logits [B, vocab]: a view of the graph's output, valid until the
        next replay."""
        bs = bucket_for(fb.batch_size, self.sizes)
        assert bs is not None, f"batch of {fb.batch_size} > cuda_graph_max_bs {self.max_bs}"
        static = self._static_batch(fb, bs)
        if not self.use_graphs:
            return self.runner.model(static)[: fb.batch_size]
        self.graphs[bs].replay()
        return self.outputs[bs][: fb.batch_size]
