"""The CUDA graph runner's bucket and padding logic (model_executor/cuda_graph_runner.py), on CPU:
with `use_graphs=False` the runner runs its padded static batches eagerly, so everything but the
capture itself is checked here. The capture runs in test/gpu on the lent GPU machine."""

from __future__ import annotations

import pytest
import torch

from lmprog import SamplingParams
from lmprog.runtime.model_executor.cuda_graph_runner import (
    CudaGraphRunner,
    DecodeGraphInputs,
    bucket_for,
    graph_batch_sizes,
)
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode


def test_batch_sizes_and_buckets() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256]
    sizes = graph_batch_sizes(20)
    assert [bucket_for(b, sizes) for b in (1, 3, 5, 9, 16, 17, 20, 21)] == [
        1, 4, 8, 16, 16, 20, 20, None,
    ]  # fmt: skip


def test_inputs_pad_with_the_padding_row_and_slot_zero() -> None:
    inputs = DecodeGraphInputs(8, padding_row=5, device=torch.device("cpu"))
    real = ForwardBatch.build(
        ForwardMode.DECODE, [11, 12, 13], [0, 2, 1], [4, 9, 0], [1, 1, 1],
        torch.tensor([40, 41, 42]), torch.device("cpu"),
    )  # fmt: skip
    fb = inputs.load(real, 4)
    assert fb.batch_size == 4 and fb.seq_lens_cpu == [5, 10, 1, 1]
    assert fb.input_ids.tolist() == [11, 12, 13, 0]
    assert fb.positions.tolist() == [4, 9, 0, 0]
    assert fb.req_pool_indices.tolist() == [0, 2, 1, 5]
    assert fb.seq_lens.tolist() == [5, 10, 1, 1] and fb.extend_prefix_lens.tolist() == [4, 9, 0, 0]
    assert fb.out_cache_loc.tolist() == [40, 41, 42, 0]
    assert fb.extend_prefix_lens_cpu == [4, 9, 0, 0] and fb.extend_seq_lens_cpu == [1] * 4
    # A smaller batch later overwrites the rows the larger one left behind.
    again = inputs.load(None, 4)
    assert again.req_pool_indices.tolist() == [5] * 4 and again.out_cache_loc.tolist() == [0] * 4
    # The batches are views of the same buffers: what a captured graph reads.
    assert again.input_ids.data_ptr() == fb.input_ids.data_ptr() == inputs.input_ids.data_ptr()
    with pytest.raises(AssertionError):
        inputs.load(real, 2)


PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]


def test_padded_static_batches_decode_as_plain_steps(llm) -> None:
    """Three requests decode through the runner's bucket of 4 (one padding row), then one and
    two: the same greedy tokens and logprobs as plain steps, and the padding row stays empty."""
    runner = llm.scheduler.model_runner
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    llm.reset_prefix_cache()
    want = llm.generate(PROMPTS, params, use_tqdm=False)
    graphs = CudaGraphRunner(runner, max_bs=4, use_graphs=False)
    assert graphs.sizes == [1, 2, 4]
    replays = []
    replay = graphs.replay
    graphs.replay = lambda fb: replays.append(fb.batch_size) or replay(fb)  # counts the calls
    runner.graph_runner = graphs
    try:
        llm.reset_prefix_cache()
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        got += llm.generate(PROMPTS[:1], params, use_tqdm=False)
    finally:
        runner.graph_runner = None
    assert replays and set(replays) <= {1, 3}
    for w, g in zip(want + want[:1], got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    rows = runner.req_to_token_pool
    assert int(rows.req_to_token[rows.padding_row].abs().sum()) == 0
