"""Our Llama-family model over the paged KV pool vs HF transformers' modelling code.

Each tiny random-weight config is built in HF (eager attention, float32), its weights copied into
ours through `load_weights`, and the logits of a fixed token sequence compared (teacher forcing):
as one prefill, token by token through decode, and batched with cached prefixes over page_size 4.
HF initializes norms to 1 and biases to 0; every parameter is randomized here, so a norm or bias
that we forget or misplace shows up. The torch_native backend is also checked on its own against
a per-sequence reference.
"""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmprog.runtime.layers.attention import RadixAttention, create_attention_backend
from lmprog.runtime.layers.kernels import cpu_kernels
from lmprog.runtime.layers.layernorm import RMSNorm
from lmprog.runtime.layers.logits_processor import fast_linear
from lmprog.runtime.layers.quantization import quantize_model
from lmprog.runtime.layers.rotary import RotaryEmbedding, rope_parameters
from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.models.llama import LlamaForCausalLM
from lmprog.runtime.models.registry import get_model_class

EXTEND, DECODE, ENCODE = ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.ENCODE
CPU = torch.device("cpu")
TOL = 1e-4
VOCAB = 160
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# llama3 scaling with a short original context, so all three frequency bands (kept, ramped,
# slowed) occur among head_dim 16's eight frequencies.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _configs() -> dict[str, object]:
    t = transformers
    return {
        "llama3_gqa": t.LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE),
        "llama_linear_bias": t.LlamaConfig(
            **SMALL,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
        "mistral": t.MistralConfig(**{**SMALL, "num_key_value_heads": 1}, head_dim=16),
        "qwen2": t.Qwen2Config(**SMALL),
        "qwen3": t.Qwen3Config(**SMALL, head_dim=24),  # head_dim != hidden / heads
        "smollm2_tied": t.LlamaConfig(**SMALL, tie_word_embeddings=True),
    }


CONFIG_NAMES = list(_configs())


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def models(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, LlamaForCausalLM]:
    """(HF reference, ours) with the same random weights."""
    config = _configs()[request.param]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:  # large enough that attention is far from uniform and RoPE matters
                p.normal_(0.0, 0.15)
    ours = LlamaForCausalLM(config)
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0].float()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedRunner:
    """Drives a model as the scheduler will: request slots, paged KV slots, one batch per step."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        page_size: int = 1,
        kv_size: int = 1024,
        backend: str = "torch_native",
    ) -> None:
        self.model = model
        self.req_pool = ReqToTokenPool(8, 256, CPU)
        self.kv_pool = TokenToKVPool(
            kv_size,
            page_size,
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
            torch.float32,
            CPU,
        )
        self.allocator = TokenToKVPoolAllocator(kv_size, page_size)
        self.backend = create_attention_backend(backend)
        self.lens: dict[int, int] = {}

    def new_request(self) -> int:
        slot = self.req_pool.alloc()
        assert slot is not None
        self.lens[slot] = 0
        return slot

    def step(self, mode: ForwardMode, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Runs the new tokens of each (request, tokens); returns each request's logits rows."""
        slots = [s for s, _ in chunks]
        prefix = [self.lens[s] for s in slots]
        ext = [len(toks) for _, toks in chunks]
        seq = [p + e for p, e in zip(prefix, ext)]
        last = [
            int(self.req_pool.req_to_token[s, p - 1]) if p else 0 for s, p in zip(slots, prefix)
        ]
        loc = self.allocator.alloc_extend(prefix, seq, last)
        assert loc is not None
        for s, p, part in zip(slots, prefix, loc.split(ext)):
            self.req_pool.write(s, p, part)
        ids = [t for _, toks in chunks for t in toks]
        fb = ForwardBatch.build(
            mode,
            ids,
            slots,
            prefix,
            ext,
            loc,
            CPU,
            req_to_token_pool=self.req_pool,
            token_to_kv_pool=self.kv_pool,
            attn_backend=self.backend,
            logits_indices=torch.arange(len(ids)),
        )
        self.backend.init_forward_metadata(fb)
        with torch.inference_mode():
            logits = self.model(fb)
        self.lens.update(zip(slots, seq))
        return list(logits.split(ext))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# ---------------------------------------------------------------- model vs HF


def test_prefill_matches_hf(models: tuple[torch.nn.Module, LlamaForCausalLM]) -> None:
    hf, ours = models
    ids = tokens(40, seed=1)
    runner = PagedRunner(ours)
    (logits,) = runner.step(EXTEND, [(runner.new_request(), ids)])
    assert logits.dtype == torch.float32
    assert max_diff(logits, hf_logits(hf, ids)) < TOL


def test_decode_token_by_token_matches_hf(models: tuple[torch.nn.Module, LlamaForCausalLM]) -> None:
    hf, ours = models
    ids = tokens(24, seed=2)
    runner = PagedRunner(ours)
    req = runner.new_request()
    rows = runner.step(EXTEND, [(req, ids[:3])])
    rows += [runner.step(DECODE, [(req, [t])])[0] for t in ids[3:]]
    assert max_diff(torch.cat(rows), hf_logits(hf, ids)) < TOL


def test_batched_extend_over_cached_prefixes(
    models: tuple[torch.nn.Module, LlamaForCausalLM],
) -> None:
    """3 requests of different lengths, cached prefixes of 6, 0 and 9 tokens, page_size 4."""
    hf, ours = models
    seqs = [tokens(n, seed=10 + i) for i, n in enumerate((13, 8, 19))]
    prefix_lens = (6, 0, 9)
    full = [tokens(1, seed=20 + i) for i in range(3)]  # one more token each, for a decode step
    expected = [hf_logits(hf, s + f) for s, f in zip(seqs, full)]

    def run(batch: list[int]) -> dict[int, list[torch.Tensor]]:
        """Prefixes one by one, then the rest of `batch` as one extend and one decode step."""
        runner = PagedRunner(ours, page_size=4)
        reqs = {i: runner.new_request() for i in batch}
        for i in batch:
            if prefix_lens[i]:
                runner.step(EXTEND, [(reqs[i], seqs[i][: prefix_lens[i]])])
        ext = runner.step(EXTEND, [(reqs[i], seqs[i][prefix_lens[i] :]) for i in batch])
        dec = runner.step(DECODE, [(reqs[i], full[i]) for i in batch])
        return {i: [e, d] for i, e, d in zip(batch, ext, dec)}

    batched = run([0, 1, 2])
    for i in range(3):
        alone = run([i])[i]
        for got, single in zip(batched[i], alone):
            assert max_diff(got, single) < 1e-5, f"request {i}: batched != alone"
        ext_logits, dec_logits = batched[i]
        assert max_diff(ext_logits, expected[i][prefix_lens[i] : len(seqs[i])]) < TOL
        assert max_diff(dec_logits, expected[i][-1:]) < TOL


def test_default_logits_rows_are_last_tokens(
    models: tuple[torch.nn.Module, LlamaForCausalLM],
) -> None:
    _, ours = models
    runner = PagedRunner(ours)
    a, b = runner.new_request(), runner.new_request()
    ids_a, ids_b = tokens(5, seed=3), tokens(7, seed=4)
    full = torch.cat(runner.step(EXTEND, [(a, ids_a), (b, ids_b)]))
    runner = PagedRunner(ours)
    a, b = runner.new_request(), runner.new_request()
    fb = ForwardBatch.build(
        EXTEND,
        ids_a + ids_b,
        [a, b],
        [0, 0],
        [5, 7],
        torch.arange(1, 13),
        CPU,
        req_to_token_pool=runner.req_pool,
        token_to_kv_pool=runner.kv_pool,
        attn_backend=runner.backend,
    )
    runner.req_pool.write(a, 0, torch.arange(1, 6))
    runner.req_pool.write(b, 0, torch.arange(6, 13))
    runner.backend.init_forward_metadata(fb)
    with torch.inference_mode():
        last = ours(fb)
    assert last.shape == (2, VOCAB)
    assert max_diff(last, full[[4, 11]]) < 1e-5


def _decode_rows(model: LlamaForCausalLM, ids: list[int], backend: str) -> torch.Tensor:
    """Logits of `ids`: a 3-token prefill, then one decode step per token, 2 requests batched
    (the second on a shifted copy) over page_size 4."""
    runner = PagedRunner(model, page_size=4, backend=backend)
    a, b = runner.new_request(), runner.new_request()
    other = [(t + 7) % VOCAB for t in ids]
    rows = runner.step(EXTEND, [(a, ids[:3]), (b, other[:3])])[:1]
    for t, u in zip(ids[3:], other[3:]):
        rows.append(runner.step(DECODE, [(a, [t]), (b, [u])])[0])
    return torch.cat(rows)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs sgl_kernel (the cpu backend)")
def test_decode_stack_matches_hf_and_the_modules(
    models: tuple[torch.nn.Module, LlamaForCausalLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cpu backend's decode steps run every layer in sgl_kernel's C++ DecodeStack (all but
    qwen3, whose per-head q/k norms it does not express): same logits as HF and as the modules."""
    hf, ours = models
    stack = ours.model.decode_stack()
    assert (stack is None) == ours.model.layers[0].self_attn.qk_norm
    ids = tokens(24, seed=2)
    got = _decode_rows(ours, ids, "cpu")
    assert max_diff(got, hf_logits(hf, ids)) < TOL
    monkeypatch.setattr(ours.model, "_stack", (None,))  # the module path, same backend
    assert max_diff(got, _decode_rows(ours, ids, "cpu")) < 1e-5


@pytest.mark.skipif(cpu_kernels() is None, reason="needs sgl_kernel (the cpu backend)")
def test_decode_stack_runs_int8_layers_as_the_modules_do(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, attention_bias=True)
    model = LlamaForCausalLM(config)
    model.load_weights(_hf_state(config).items())
    assert len(quantize_model(model, "int8")) == 9  # 4 per layer and the LM head
    assert model.model.decode_stack() is not None
    ids = tokens(12, seed=5)
    got = _decode_rows(model, ids, "cpu")
    monkeypatch.setattr(model.model, "_stack", (None,))
    assert max_diff(got, _decode_rows(model, ids, "cpu")) < 1e-5


# ---------------------------------------------------------------- loading, registry, rope


def _tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def _hf_state(config: object) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_config(config).state_dict()


def test_load_weights_fails_clearly() -> None:
    state = _hf_state(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        _tiny_llama().load_weights([*state.items(), ("model.layers.0.mlp.extra.weight", None)])
    missing = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match=r"1 weights missing.*layers\.1\.self_attn\.qkv_proj"):
        _tiny_llama().load_weights(missing.items())
    bad = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        _tiny_llama().load_weights(bad.items())


def test_registry() -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert get_model_class(["Foo", arch]) is LlamaForCausalLM
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        get_model_class(["GPT2LMHeadModel"])


def test_rope_parameters_from_legacy_config_and_table_growth() -> None:
    legacy = types.SimpleNamespace(
        rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4}
    )
    params = rope_parameters(legacy)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 500000.0
    rope = RotaryEmbedding(head_dim=8, max_position=16, params=params)
    rope.ensure(40)  # past max_position_embeddings: the table grows
    pos = torch.tensor([0, 5, 39])
    cos, sin = rope.cos_sin(pos, torch.float32)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 8, 2).float() / 8) / 4
    assert torch.allclose(cos[:, 0], torch.cos(pos[:, None] * inv_freq), atol=1e-6)
    assert torch.allclose(sin[:, 0], torch.sin(pos[:, None] * inv_freq), atol=1e-6)
    with pytest.raises(NotImplementedError, match="dynamic"):
        RotaryEmbedding(8, 16, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})


def test_fast_linear_matches_f_linear_and_keeps_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((5, 32), (48, 32), (48,)))
    assert max_diff(fast_linear(x, w, b), torch.nn.functional.linear(x, w, b)) < 1e-5
    assert max_diff(fast_linear(x[:, :16], w[:, :16]), x[:, :16] @ w[:, :16].T) < 1e-5
    xg = x.clone().requires_grad_()
    fast_linear(xg, w, b).sum().backward()  # falls back to F.linear: a correct gradient
    assert max_diff(xg.grad, w.sum(0).expand(5, -1)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_and_adds_residual(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    ours, ref = RMSNorm(64, 1e-5, dtype), LlamaRMSNorm(64, 1e-5).to(dtype).requires_grad_(False)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        ref.weight.copy_(ours.weight)
    x, res = x.to(dtype), res.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_diff(ours(x).float(), ref(x).float()) < tol
    summed = res + x
    normed, res_out = ours(x, res)
    assert res_out is res and torch.equal(res, summed)  # updated in place
    assert max_diff(normed.float(), ref(summed).float()) < tol


# ---------------------------------------------------------------- torch_native backend alone

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, causal: bool
) -> torch.Tensor:
    """One sequence: q [n, H, D] at positions prefix.., k/v [prefix + n, Hkv, D] -> [n, H*D]."""
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM**-0.5
    if causal:
        q_pos = prefix + torch.arange(q.shape[0])
        scores.masked_fill_(torch.arange(k.shape[0])[None, :] > q_pos[:, None], float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    "mode, prefix_lens, extend_lens",
    [
        (EXTEND, [5, 0, 3], [4, 7, 1]),  # over cached prefixes (one empty)
        (EXTEND, [0, 0, 0], [4, 7, 1]),  # batched prefill: the is_causal fast path, padded
        (EXTEND, [0], [6]),  # one prefill: no padding, no gather
        (EXTEND, [4], [3]),  # one request over a prefix
        (DECODE, [5, 1, 9], [1, 1, 1]),
        (ENCODE, [0, 0, 0], [3, 5, 1]),
        (ENCODE, [0], [5]),
    ],
)
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_native_backend_vs_reference(
    mode: ForwardMode,
    prefix_lens: list[int],
    extend_lens: list[int],
    page_size: int,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    req_pool = ReqToTokenPool(4, 32, CPU)
    kv_pool = TokenToKVPool(128, page_size, 2, KV_HEADS, HEAD_DIM, dtype, CPU)
    kv_pool.k_buffer[0].normal_()  # layer 0 holds garbage: layer 1 must read only its own
    allocator = TokenToKVPoolAllocator(128, page_size)
    layer = RadixAttention(1, HEADS, HEAD_DIM, KV_HEADS)
    slots = [req_pool.alloc() for _ in prefix_lens]
    prefix_kv = []
    for slot, p in zip(slots, prefix_lens):  # cache each prefix's K/V, as earlier steps would
        loc = allocator.alloc_extend([0], [p], [0])
        req_pool.write(slot, 0, loc)
        pk, pv = rand(p, KV_HEADS, HEAD_DIM), rand(p, KV_HEADS, HEAD_DIM)
        kv_pool.set_kv_buffer(1, loc, pk, pv)
        prefix_kv.append((pk, pv))
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    last = [int(req_pool.req_to_token[s, p - 1]) if p else 0 for s, p in zip(slots, prefix_lens)]
    loc = allocator.alloc_extend(prefix_lens, seq_lens, last)
    for slot, p, part in zip(slots, prefix_lens, loc.split(extend_lens)):
        req_pool.write(slot, p, part)
    t = sum(extend_lens)
    q, k, v = rand(t, HEADS, HEAD_DIM), rand(t, KV_HEADS, HEAD_DIM), rand(t, KV_HEADS, HEAD_DIM)
    backend = create_attention_backend("torch_native")
    fb = ForwardBatch.build(
        mode,
        [0] * t,
        slots,
        prefix_lens,
        extend_lens,
        loc,
        CPU,
        req_to_token_pool=req_pool,
        token_to_kv_pool=kv_pool,
        attn_backend=backend,
    )
    backend.init_forward_metadata(fb)
    out = layer(q, k, v, fb)
    parts = zip(q.split(extend_lens), k.split(extend_lens), v.split(extend_lens), prefix_kv)
    expected = [  # in float32, from the same (possibly bf16-rounded) inputs
        reference_attention(
            qi.float(),
            torch.cat([pk, ki]).float(),
            torch.cat([pv, vi]).float(),
            len(pk),
            causal=mode != ENCODE,
        )
        for qi, ki, vi, (pk, pv) in parts
    ]
    assert out.shape == (t, HEADS * HEAD_DIM) and out.dtype == dtype
    assert max_diff(out.float(), torch.cat(expected)) < (1e-5 if dtype == torch.float32 else 3e-2)
