"""The Triton extend attention kernel (layers/attention/triton_extend.py) against a gather +
softmax reference, on CPU under TRITON_INTERPRET=1 (in a subprocess: the interpreter is chosen
when Triton is imported), and the `triton` backend's extend steps on a tiny Llama against the
torch_native backend's. Small shapes: the interpreter runs each program in numpy."""

from __future__ import annotations

import pytest
from triton_interpret import run_interpreted

pytest.importorskip("triton", reason="Triton is not installed")

# Ragged batches over a shuffled pool (slots of a request are not contiguous, q is a strided
# view of a wider qkv tensor). Blocks of 16 query rows and 16 keys, so requests span several of
# each. Each case: heads, kv_heads, head_dim, v_head_dim, prefix_lens, extend_lens.
CASES = """
CASES = [
    (4, 4, 16, 16, [0, 5, 20], [7, 1, 18]),  # GQA group 1; no prefix; one new token
    (4, 2, 32, 16, [3, 0], [40, 2]),  # group 2; v_head_dim != head_dim
    (8, 2, 24, 24, [1, 33, 0, 7], [1, 1, 17, 9]),  # group 4; a dim that is no power of two
    (2, 1, 8, 8, [16], [16]),  # a dim under tl.dot's minimum of 16; block-aligned lengths
]
"""

KERNEL_CHECK = (
    CASES
    + """
import torch
from lmprog.runtime.layers.attention.triton_extend import extend_attention

def reference(q, k, v, r2t, idx, prefix, ext, scale):
    out, row = [], 0
    for b in range(len(ext)):
        n = prefix[b] + ext[b]
        slots = r2t[idx[b], :n]
        group = q.shape[1] // k.shape[1]
        kb = k[slots].float().repeat_interleave(group, 1)  # [n, H, D]
        vb = v[slots].float().repeat_interleave(group, 1)
        qb = q[row : row + ext[b]].float()  # [e, H, D]
        s = torch.einsum("ehd,nhd->hen", qb, kb) * scale
        q_pos = prefix[b] + torch.arange(ext[b])
        s = s.masked_fill(torch.arange(n)[None, :] > q_pos[:, None], float("-inf"))
        out.append(torch.einsum("hen,nhd->ehd", s.softmax(-1), vb))
        row += ext[b]
    return torch.cat(out)

def run(case, dtype, gen):
    heads, kv_heads, d, dv, prefix, ext = case
    slots = 300
    k = torch.randn(slots, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, dv, generator=gen).to(dtype)
    r2t = torch.zeros(len(ext) + 1, 64, dtype=torch.int64)
    idx = torch.arange(len(ext), 0, -1)  # pool rows in reverse order of the batch
    for b, n in enumerate(p + e for p, e in zip(prefix, ext)):
        r2t[idx[b], :n] = torch.randperm(slots - 1, generator=gen)[:n] + 1
    t = sum(ext)
    qkv = torch.randn(t, heads * d + 2 * kv_heads * d, generator=gen).to(dtype)
    q = qkv[:, : heads * d].view(t, heads, d)
    p, e = torch.tensor(prefix), torch.tensor(ext)
    starts = torch.cumsum(e, 0) - e
    scale = 0.7 * d ** -0.5
    got = extend_attention(
        q, k, v, r2t, idx, p, e, starts, max(ext), scale, block_m=16, block_n=16
    )
    assert got.shape == (t, heads, dv) and got.dtype == dtype, (got.shape, got.dtype)
    return (got.float() - reference(q, k, v, r2t, idx, prefix, ext, scale)).abs().max().item()
"""
)

FP32_CHECK = (
    KERNEL_CHECK
    + """
gen = torch.Generator().manual_seed(0)
print("max error", max(run(case, torch.float32, gen) for case in CASES))
"""
)


def test_extend_kernel_matches_the_reference_under_the_interpreter() -> None:
    error = float(run_interpreted(FP32_CHECK).split()[-1])
    assert error < 1e-4, f"max error {error}"


FP16_CHECK = (
    KERNEL_CHECK
    + """
gen = torch.Generator().manual_seed(1)
print("max error", max(run(case, torch.float16, gen) for case in CASES[:2]))
"""
)


def test_extend_kernel_in_half_precision() -> None:
    """fp16 inputs (the reference reads the same fp16 values in fp32): only the rounding of the
    probabilities and of the output to fp16 differ. bf16 takes the same code path, but the
    interpreter cannot multiply bf16 (triton-lang/triton#11584)."""
    error = float(run_interpreted(FP16_CHECK).split()[-1])
    assert error < 2e-3, f"max error {error}"


MODEL_CHECK = """
import torch, test_llama_vs_hf as t
from lmprog.runtime.models.llama import LlamaForCausalLM
import transformers
config = t._configs()["llama3_gqa"]
torch.manual_seed(0)
hf = transformers.AutoModelForCausalLM.from_config(config)
model = LlamaForCausalLM(config)
model.load_weights(hf.state_dict().items())

def logits(backend):
    runner = t.PagedRunner(model, page_size=4, backend=backend)
    seqs = [t.tokens(n, seed=10 + i) for i, n in enumerate((13, 8, 75))]
    prefix = (6, 0, 66)
    reqs = [runner.new_request() for _ in seqs]
    rows = runner.step(t.EXTEND, [(r, s[:p]) for r, s, p in zip(reqs, seqs, prefix) if p])
    rows += runner.step(t.EXTEND, [(r, s[p:]) for r, s, p in zip(reqs, seqs, prefix)])
    rows += runner.step(t.DECODE, [(r, [5]) for r in reqs])
    rows += runner.step(t.EXTEND, [(r, [7 + i]) for i, r in enumerate(reqs)])
    return torch.cat(rows)

got, want = logits("triton"), logits("torch_native")
assert got.shape == want.shape == (6 + 66 + 7 + 8 + 9 + 3 + 3, t.VOCAB), got.shape
print("max error", (got - want).abs().max().item())
"""


def test_backend_extends_a_model_as_torch_native_does() -> None:
    """A tiny Llama (GQA, page_size 4) through the `triton` backend: a prefill of two prompts
    (66 tokens: two blocks of query rows), an extend of three requests over cached prefixes of
    6, 0 and 66 tokens, a decode step, and a one-token extend over each whole context give the
    torch_native backend's logits."""
    pytest.importorskip("transformers")
    error = float(run_interpreted(MODEL_CHECK).split()[-1])
    assert error < 1e-4, f"max error {error}"


def test_backend_refuses_head_dims_its_decode_kernel_cannot_take() -> None:
    """qwen3's test config has head_dim 24: the first prefill fails and says why (no kernel
    runs, so this needs no interpreter)."""
    pytest.importorskip("transformers")
    import test_llama_vs_hf as t

    from lmprog.runtime.models.llama import LlamaForCausalLM

    runner = t.PagedRunner(LlamaForCausalLM(t._configs()["qwen3"]), backend="triton")
    with pytest.raises(ValueError, match="power-of-two head dims; head_dim is 24"):
        runner.step(t.EXTEND, [(runner.new_request(), t.tokens(5, seed=1))])
