"""The engine on CUDA in bf16 with every attention backend, CUDA graphs on and off, on a
random-weight Llama built here (load_format="dummy"): teacher-forced logits of prefill and
decode steps agree with torch_native's within bf16 tolerance, and LLM.generate runs end to end
through the graphs. Skipped without CUDA; run by benchmarks/gpu/device_check.sh."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from lmprog import LLM, SamplingParams
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.model_executor.model_runner import ModelRunner
from lmprog.runtime.model_loader.dummy_folder import write_dummy_model_folder
from lmprog.runtime.server_args import ServerArgs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048,
    )  # fmt: skip
    return str(write_dummy_model_folder(tmp_path_factory.mktemp("llama-dummy"), config))


def runner(model_dir: str, backend: str, graphs: bool, page_size: int = 1) -> ModelRunner:
    args = ServerArgs(
        model_path=model_dir, load_format="dummy", device="cuda", dtype="bfloat16",
        attention_backend=backend, disable_cuda_graph=not graphs, cuda_graph_max_bs=8,
        max_total_tokens=16384, max_running_requests=8, page_size=page_size,
    )  # fmt: skip
    return ModelRunner(args)


def teacher_forced(r: ModelRunner, prompts: list[list[int]], forced: list[list[int]]) -> list:
    """Log-softmax rows of a prefill of `prompts`, then one decode step per forced token."""
    rows = [r.req_to_token_pool.alloc() for _ in prompts]
    lens = [0] * len(prompts)
    out = []

    def run(mode: ForwardMode, chunks: list[list[int]]) -> None:
        ends = [n + len(c) for n, c in zip(lens, chunks)]
        last = [r.req_to_token_pool.last_slot(s, n) for s, n in zip(rows, lens)]
        loc = r.allocator.alloc_extend(lens, ends, last)
        ext = [len(c) for c in chunks]
        r.req_to_token_pool.write_runs(rows, lens, ext, loc)
        fb = ForwardBatch.build(
            mode, [t for c in chunks for t in c], rows, list(lens), ext, loc, CUDA
        )
        out.append(torch.log_softmax(r.forward(fb), -1).cpu())
        lens[:] = ends

    run(ForwardMode.EXTEND, prompts)
    for step in zip(*forced):
        run(ForwardMode.DECODE, [[t] for t in step])
    return out


@pytest.mark.parametrize("page_size", [1, 16])
def test_backends_and_graphs_agree_on_teacher_forced_logits(model_dir: str, page_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (20, 33, 7)]
    forced = [torch.randint(3, 4096, (12,), generator=gen).tolist() for _ in prompts]
    want = teacher_forced(runner(model_dir, "torch_native", False, page_size), prompts, forced)
    configs = [("triton", False), ("triton", True)]
    try:
        import flashinfer  # noqa: F401

        configs += [("flashinfer", False), ("flashinfer", True)]
    except ImportError:
        pass
    for backend, graphs in configs:
        r = runner(model_dir, backend, graphs, page_size)
        assert (r.graph_runner is not None) == graphs
        got = teacher_forced(r, prompts, forced)
        for i, (a, b) in enumerate(zip(want, got)):
            err = float((a - b).abs().max())
            agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
            assert err < 0.1 and agree >= 0.6, f"{backend} graphs={graphs} step {i}: {err} {agree}"
        del r
        torch.cuda.empty_cache()


def test_generate_runs_through_the_default_backend_and_graphs(model_dir: str) -> None:
    llm = LLM(
        model=model_dir, load_format="dummy", device="cuda", max_total_tokens=16384,
        cuda_graph_max_bs=16, seed=0,
    )  # fmt: skip
    r = llm.scheduler.model_runner
    assert r.dtype == torch.bfloat16 and r.graph_runner is not None
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(11)]  # 11 rows: the bucket of 16 pads 5
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    again = llm.generate(prompts, params, use_tqdm=False)  # prefix-cached prompts, same tokens
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]
    stats = llm.get_kv_stats()
    assert stats["free"] + stats["evictable"] + stats["protected"] == stats["total"]
