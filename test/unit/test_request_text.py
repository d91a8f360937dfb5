"""Text work of the API process: the lower bound on a prompt's tokens that refuses over-long
texts without tokenizing them, and /generate's logprob fields decoding each token once."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmprog.runtime.entrypoints.generate_api import _LogprobMeta, _LogprobRequest
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput
from lmprog.runtime.managers.prompt_bound import PromptBound
from lmprog.runtime.sampling.sampling_params import SamplingParams

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld ☃ 123 <tag>"] * 50


def _byte_level(normalizer=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level()


def test_the_bound_never_exceeds_the_real_count(tokenizer) -> None:
    bound = PromptBound(tokenizer)
    assert bound.max_token_bytes and bound.max_token_bytes > 1
    rng = random.Random(0)
    alphabet = "the quick brown fox héllo ☃ 123 <>\n  "
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        text += rng.choice(CORPUS) * rng.randint(0, 3)
        assert bound.at_least(text) <= len(tokenizer.encode(text)), text


def test_no_bound_with_a_normalizer() -> None:
    """A normalizer may shrink text (collapse spaces), so nothing can be promised."""
    bound = PromptBound(_byte_level(normalizers.Lowercase()))
    assert bound.max_token_bytes is None and bound.at_least("x" * 10**6) == 0


class CountingTokenizer:
    """The real tokenizer, counting the tokens it decodes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def test_streamed_logprob_text_decodes_each_token_once(tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    req = TokenizedGenerateReqInput("r", ids[:3], SamplingParams())
    lp = _LogprobRequest(wanted=True, start=0, top=2, with_text=True)
    meta = _LogprobMeta(req, lp, counting)
    prompt = [(None, {})] + [(-1.0, {ids[0]: -0.5, ids[1]: -1.0})] * 2
    for k, token in enumerate(ids[3:]):
        top = {token: -0.1, ids[0]: -2.0}
        meta.add(
            SeqOutput(
                "r",
                0,
                [token],
                "",
                [(-0.1, top)],
                None,
                3,
                k + 1,
                0,
                input_logprobs=prompt if k == 0 else None,
            )
        )
    generated = len(ids) - 3
    # prompt: 3 tokens + 2 x top-2; output: each token + its top-2, each decoded once
    assert counting.decoded == 3 + 2 * 2 + 3 * generated
    fields = meta.fields
    assert [t[2] for t in fields["output_token_logprobs"]] == [
        tokenizer.decode([t]) for t in ids[3:]
    ]
    assert fields["input_top_logprobs"][0] is None and len(fields["input_token_logprobs"]) == 3
