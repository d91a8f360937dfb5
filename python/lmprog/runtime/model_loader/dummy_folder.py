"""A model folder with no weights, for `load_format="dummy"`: a config and a synthetic tokenizer.

Speed tests of real model shapes (Llama-3.1-8B's, say) need no real weights, and on machines
that cannot reach a model hub there are none to load. `write_dummy_model_folder` writes the
config and a word-level tokenizer whose token i is spelled `<i>` (special tokens `<s>`, `</s>`),
so the engine, its detokenizer and its stop checks run as they do for a real model:

    write_dummy_model_folder("/tmp/llama-8b-shape", LlamaConfig(hidden_size=4096, ...))
    LLM(model="/tmp/llama-8b-shape", load_format="dummy")
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PretrainedConfig, PreTrainedTokenizerFast


def write_dummy_model_folder(folder: str | Path, config: PretrainedConfig) -> Path:
    """Writes config.json and the tokenizer files of `config.vocab_size` tokens; returns the
    folder. Token 1 is BOS (`<s>`), token 2 EOS (`</s>`), as the config's ids say."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    vocab["<s>"], vocab["</s>"] = vocab.pop("<1>"), vocab.pop("<2>")
    core = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<0>"
    )
    config.bos_token_id, config.eos_token_id = 1, 2
    if not getattr(config, "architectures", None):  # a config made in code names none
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
