"""The Triton decode attention kernel (layers/attention/triton_decode.py) against a gather +
softmax reference, on CPU under TRITON_INTERPRET=1 (in a subprocess: the interpreter is chosen
when Triton is imported). Small shapes: the interpreter runs each program in numpy."""

from __future__ import annotations

import pytest
from triton_interpret import run_interpreted

CHECK = """
import torch
from lmprog.runtime.layers.attention.triton_decode import decode_attention

def reference(q, k, v, r2t, idx, lens, scale):
    out = []
    for b in range(q.shape[0]):
        slots = r2t[idx[b], : lens[b]]
        kb, vb = k[slots].float(), v[slots].float()  # [L, Hkv, D]
        group = q.shape[1] // k.shape[1]
        kb, vb = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), kb) * scale
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), vb))
    return torch.stack(out)

gen = torch.Generator().manual_seed(0)
worst = 0.0
for heads, kv_heads, d, lens in [(4, 2, 16, [1, 7, 40]), (4, 4, 32, [33]), (8, 1, 16, [5, 64, 2])]:
    slots = 200
    k = torch.randn(slots, kv_heads, d, generator=gen)
    v = torch.randn(slots, kv_heads, d, generator=gen)
    r2t = torch.zeros(len(lens) + 1, 80, dtype=torch.int64)
    for b, n in enumerate(lens):
        r2t[b + 1, :n] = torch.randperm(slots - 1, generator=gen)[:n] + 1
    idx = torch.arange(1, len(lens) + 1)
    seq = torch.tensor(lens)
    q = torch.randn(len(lens), heads, d, generator=gen)
    want = reference(q, k, v, r2t, idx, seq, d ** -0.5)
    for splits, block_n in ((4, 8), (None, 16)):  # None: the default for the batch shape
        got = decode_attention(q, k, v, r2t, idx, seq, d ** -0.5, splits=splits, block_n=block_n)
        worst = max(worst, (got - want).abs().max().item())
print("max error", worst)
"""


def test_decode_kernel_matches_the_reference_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="Triton is not installed")
    error = float(run_interpreted(CHECK).split()[-1])
    assert error < 1e-4, f"max error {error}"


MODEL_CHECK = """
import torch, test_llama_vs_hf as t
from lmprog.runtime.models.llama import LlamaForCausalLM
import transformers
config = t._configs()["llama3_gqa"]
torch.manual_seed(0)
hf = transformers.AutoModelForCausalLM.from_config(config)
model = LlamaForCausalLM(config)
model.load_weights(hf.state_dict().items())
ids = t.tokens(12, seed=3)
got = t._decode_rows(model, ids, "triton")
want = t._decode_rows(model, ids, "torch_native")
print("max error", (got - want).abs().max().item())
"""


def test_backend_decodes_a_model_as_torch_native_does() -> None:
    """The `triton` backend's decode steps on a tiny Llama (2 requests, page_size 4) give the
    torch_native backend's logits."""
    pytest.importorskip("triton", reason="Triton is not installed")
    pytest.importorskip("transformers")
    error = float(run_interpreted(MODEL_CHECK).split()[-1])
    assert error < 1e-4, f"max error {error}"
