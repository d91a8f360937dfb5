"""token_logprobs: scores known tokens exactly like a full log-softmax, across row blocks."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.layers.logprobs import token_logprobs


@pytest.mark.parametrize("top", [0, 3])
def test_scores_match_log_softmax_across_blocks(top: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(600, 97, generator=gen) * 4  # more rows than one block
    targets = torch.randint(0, 97, (600,), generator=gen)
    ref = torch.log_softmax(logits, dim=-1)
    out = token_logprobs(logits, targets, top)
    assert len(out) == 600
    chosen = torch.tensor([c for c, _ in out])
    assert torch.allclose(chosen, ref.gather(1, targets[:, None]).squeeze(1), atol=1e-5)
    for row in (0, 255, 256, 599):
        _, best = out[row]
        if top == 0:
            assert best == {}
        else:
            values, ids = ref[row].topk(top)
            assert list(best) == ids.tolist()
            assert list(best.values()) == pytest.approx(values.tolist(), abs=1e-5)


def test_rows_and_targets_must_agree() -> None:
    with pytest.raises(ValueError, match="3 rows of logits for 2 targets"):
        token_logprobs(torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64), 0)
