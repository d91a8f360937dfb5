"""The Sampler: picks each row's next token from the model's logits, batched.

One call per decode step:

    raw logits [B, V] ──► logprobs (log_softmax of the raw logits, when any row asks)
        │
        ├─► logit_bias ─► penalties ─► min_tokens mask (EOS / stop ids = -inf)
        │       ├─► greedy rows:  argmax
        │       ├─► plain rows:   logits / T, sampled from the full distribution
        │       └─► truncated rows: logits / T, top_k ─► top_p ─► min_p, then sampled
        ▼
    SamplerOutput(next_token_ids, logprobs, top_logprobs, top_logprob_ids)

Truncation semantics (HF transformers' order, which vLLM's results match):
  - top_k keeps the k most likely tokens;
  - top_p then keeps the smallest prefix of those (most likely first) whose mass, renormalised
    over the top-k set, reaches top_p: token j stays iff the mass strictly before it is < top_p;
  - min_p drops tokens whose probability is below min_p times the top token's (a ratio, so
    renormalisation does not change it).
  The most likely token always survives.

Seeded sampling without per-row generators: the exponential race. Each (row, vocab id)
gets E ~ Exp(1) from a counter-based hash of (seed, step, vocab id), and the row picks
argmax_j p_j / E_j = argmax_j (logit_j / T - log E_j), which is an exact sample from p.
Because E depends only on (seed, step, token id), a row's token depends only on its own
logits and parameters: not on its batch position, the other rows, or which internal path
(top-k candidates, a full-row floor) served it, all of which keep the same token set (up to
float rounding of a cumulative sum landing exactly on top_p). Different seeds give
independent draws.

Cost control (a full sort of 64 x 49152 floats takes ~120 ms on 2 CPU cores): truncated
rows first work on the top-K candidates from `torch.topk` (K = 256, or the largest top_k),
which is exact whenever a row's kept set provably lies inside them (top_k <= K, or the
candidates' mass reaches top_p, or the K-th candidate is below the min_p floor). Rows where
that fails (flat distributions, high temperatures) take their top_k exactly, or find top_p's
boundary value with one histogram pass and race over the full row. Deciding which rows need
that costs a device sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmprog.runtime.sampling.penalties import apply_penalties_
from lmprog.runtime.sampling.sampling_batch_info import SamplingBatchInfo
from lmprog.runtime.sampling.seeded_random import argmax_first, race, row_keys

# top_p's histogram (see _top_p_floor): bins of 1/8 nat over the 32 nats below a row's best
# logit; tokens further down (probability ratio < 1e-14) share the last bin.
_BINS_PER_NAT = 8
_BINS = 256
_TINY_P = 1e-30


@dataclass
class SamplerOutput:
    """The step's result for B rows (all tensors on the logits' device).

    logprobs, top_logprobs and top_logprob_ids are computed for every row when any row
    asked for logprobs (None otherwise); top_logprobs has K = the most any row asked for
    (None when that is 0), sorted most likely first. Rows that asked for fewer take a prefix.
    """

    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: logprob of the chosen token
    top_logprobs: torch.Tensor | None  # [B, K] float32
    top_logprob_ids: torch.Tensor | None  # [B, K] int64

    def to_host(self) -> SamplerOutput:
        """The same on the CPU: the step's one read-back (the first copy waits for the GPU,
        the rest find the results ready), so per-row reads cost no device sync."""
        tensors = (self.next_token_ids, self.logprobs, self.top_logprobs, self.top_logprob_ids)
        return SamplerOutput(*(None if t is None else t.cpu() for t in tensors))

    def row_logprobs(self, row: int, k: int) -> tuple[float, dict[int, float]]:
        """Row `row`'s chosen-token logprob and its top `k` as {token id: logprob}."""
        top: dict[int, float] = {}
        if k and self.top_logprobs is not None:
            ids = self.top_logprob_ids[row, :k].tolist()
            top = dict(zip(ids, self.top_logprobs[row, :k].tolist()))
        return float(self.logprobs[row]), top


class Sampler:
    """Turns a step's logits into next tokens; stateless apart from its settings."""

    def __init__(self, candidates: int = 256) -> None:
        """`candidates`: how many top tokens truncated rows try before a wider search."""
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        self.candidates = candidates

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SamplerOutput:
        """Sample one token per row. Does not modify `logits`."""
        if logits.dim() != 2 or logits.shape[0] != info.batch_size:
            raise ValueError(
                f"logits must be [batch={info.batch_size}, vocab], got {tuple(logits.shape)}"
            )
        raw = _real_vocab(logits, info.vocab_size)
        log_norm = torch.logsumexp(raw, dim=-1) if info.need_logprobs else None
        processed = _penalised(raw, info)
        next_ids = self._pick(processed, info)
        if log_norm is None:
            return SamplerOutput(next_ids, None, None, None)
        return _with_logprobs(raw, log_norm, next_ids, info.max_logprobs)

    def _pick(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        if info.is_all_greedy:
            return argmax_first(logits)
        keys = row_keys(info.seeds, info.steps)
        next_ids = torch.empty(info.batch_size, dtype=torch.int64, device=logits.device)
        if info.greedy_rows.numel():
            rows = info.greedy_rows
            next_ids.index_copy_(0, rows, argmax_first(logits.index_select(0, rows)))
        if info.plain_rows.numel():
            rows = info.plain_rows
            scaled = _scaled(logits, rows, info.temperatures)
            next_ids.index_copy_(0, rows, race(scaled, keys[rows], None, info.vocab_size))
        if info.truncated_rows.numel():
            rows = info.truncated_rows
            scaled = _scaled(logits, rows, info.temperatures)
            truncation = _Truncation.of(info, rows)
            tokens = self._sample_truncated(scaled, keys[rows], truncation, info)
            next_ids.index_copy_(0, rows, tokens)
        return next_ids

    def _sample_truncated(
        self,
        scaled: torch.Tensor,
        keys: torch.Tensor,
        trunc: _Truncation,
        info: SamplingBatchInfo,
    ) -> torch.Tensor:
        """Sample rows that use top_k/top_p/min_p: from the top candidates when that is
        provably exact, else from a wider (exact) set."""
        vocab = scaled.shape[1]
        width = self._first_width(info, vocab)
        log_norm = torch.logsumexp(scaled, -1, keepdim=True) if trunc.use_top_p else None
        tokens, exact = _sample_top(scaled, keys, trunc, log_norm, width)
        if width == vocab:
            return tokens
        inexact = (~exact).nonzero().squeeze(1)  # NOTE: a device sync.
        return _resample_rows(tokens, inexact, _sample_wide, scaled, keys, trunc, log_norm)

    def _first_width(self, info: SamplingBatchInfo, vocab: int) -> int:
        """How many top candidates truncated rows try first."""
        if info.all_truncated_use_top_k:  # each row's own k bounds its kept set
            width = info.max_top_k
        elif info.max_top_k <= 4 * self.candidates:
            width = max(self.candidates, info.max_top_k)
        else:  # one huge top_k should not widen every row: it takes the wide path
            width = self.candidates
        return min(width, vocab)


# -- logits preparation ---------------------------------------------------------------------


def _real_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits of the real vocabulary: padding columns (>= vocab_size) are cut off."""
    width = logits.shape[1]
    if width < vocab_size:
        raise ValueError(f"logits have {width} columns; the vocabulary has {vocab_size} tokens")
    if width > vocab_size:
        logits = logits[:, :vocab_size]
    return logits.float()


def _penalised(raw: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """The logits the tokens are picked from: raw, plus logit_bias, penalties and the
    min_tokens mask, in that order (vLLM v1's; OpenAI only says the bias is added before
    sampling). All are applied to a copy, so logprobs still come from the raw logits (vLLM's
    default raw_logprobs too): like a penalty, a bias changes which token is picked, not the
    model's probabilities reported for it."""
    if not (info.need_logit_bias or info.need_penalties or info.need_min_tokens_mask):
        return raw
    logits = raw.clone(memory_format=torch.contiguous_format)
    if info.logit_bias_rows is not None:
        # One scatter for the whole batch; a row lists each id once (a dict), and a cell
        # already at -inf (a grammar's mask) stays -inf whatever the bias.
        cells = (info.logit_bias_rows, info.logit_bias_ids)
        logits.index_put_(cells, info.logit_bias_values, accumulate=True)
    if info.penalties is not None:
        apply_penalties_(logits, info.penalties)
    if info.min_tokens_rows is not None:
        logits[info.min_tokens_rows, info.min_tokens_ids] = -math.inf
    return logits


def _scaled(logits: torch.Tensor, rows: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits[rows] / temperature, as a new tensor."""
    if rows.numel() == logits.shape[0]:  # rows are ascending and distinct: all of them
        return logits / temperatures[:, None]
    return logits.index_select(0, rows).div_(temperatures[rows][:, None])


def _with_logprobs(
    raw: torch.Tensor, log_norm: torch.Tensor, next_ids: torch.Tensor, top: int
) -> SamplerOutput:
    """Log-probabilities under the raw model distribution (before penalties and
    temperature): the chosen token's, and the `top` most likely."""
    chosen = raw.gather(1, next_ids[:, None]).squeeze(1) - log_norm
    if top == 0:
        return SamplerOutput(next_ids, chosen, None, None)
    values, ids = raw.topk(min(top, raw.shape[1]), dim=-1)
    return SamplerOutput(next_ids, chosen, values - log_norm[:, None], ids)


# -- truncation --------------------------------------------------------------------------------


@dataclass
class _Truncation:
    """top_k / top_p / min_p of some rows ([n] tensors; top_k == vocab means off), and
    whether any of them uses top_p / min_p (so unused steps are skipped)."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    use_top_p: bool
    use_min_p: bool

    @classmethod
    def of(cls, info: SamplingBatchInfo, rows: torch.Tensor) -> _Truncation:
        return cls(
            info.top_ks[rows],
            info.top_ps[rows],
            info.min_ps[rows],
            info.need_top_p,
            info.need_min_p,
        )

    def rows(self, index: torch.Tensor) -> _Truncation:
        return _Truncation(
            self.top_k[index], self.top_p[index], self.min_p[index], self.use_top_p, self.use_min_p
        )


def _sample_top(
    scaled: torch.Tensor,
    keys: torch.Tensor,
    trunc: _Truncation,
    log_norm: torch.Tensor | None,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample each row from its `width` most likely tokens after truncation.

    Returns (token ids [n], exact [n] bool): `exact` says the row's kept set provably lies
    inside those candidates, i.e. the token is what a full sort would have given.
    """
    if width >= scaled.shape[1]:
        values, ids = scaled.sort(dim=-1, descending=True)
    else:
        values, ids = scaled.topk(width, dim=-1)
    masked, exact = _truncate_sorted(values, trunc, log_norm, scaled.shape[1])
    column = race(masked, keys, ids, scaled.shape[1])
    return ids.gather(1, column[:, None]).squeeze(1), exact


def _truncate_sorted(
    values: torch.Tensor, trunc: _Truncation, log_norm: torch.Tensor | None, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (-inf) the truncated tokens among the candidates `values` [n, K] (a row's K
    largest scaled logits, descending). `log_norm` [n, 1] is the logsumexp of the full row
    (needed for top_p). Returns (masked values, exact [n] bool)."""
    count = values.shape[1]
    position = torch.arange(count, device=values.device)
    drop = position[None, :] >= trunc.top_k[:, None]
    top_k_on = trunc.top_k < vocab
    # NOTE: top_k <= K makes the kept set a subset of the candidates, whatever top_p does.
    exact = trunc.top_k <= count
    if trunc.use_top_p:
        assert log_norm is not None, "top_p needs the full row's logsumexp"
        probs = (values - log_norm).exp_().masked_fill_(drop, 0.0)
        cumulative = probs.cumsum(dim=-1)
        reached = cumulative[:, -1]
        # top_p is over the top-k set renormalised: mass of that set, or 1 without top_k.
        kept_mass = torch.where(top_k_on, reached, torch.ones_like(reached))
        limit = torch.where(trunc.top_p < 1.0, trunc.top_p * kept_mass, math.inf)
        drop |= (cumulative - probs) >= limit[:, None]
        exact |= ~top_k_on & (trunc.top_p < 1.0) & (reached >= trunc.top_p)
    if trunc.use_min_p:
        floor = values[:, 0] + torch.log(trunc.min_p)  # log(0) = -inf: no floor
        drop |= values < floor[:, None]
        # Every token outside the candidates is <= the last candidate, so below the floor
        # too; but with top_p over a top-k set wider than K the renormalising mass is unknown.
        cleared = (trunc.min_p > 0.0) & (values[:, -1] < floor)
        exact |= cleared & (~top_k_on | (trunc.top_p >= 1.0))
    return values.masked_fill(drop, -math.inf), exact


def _sample_wide(
    scaled: torch.Tensor, keys: torch.Tensor, trunc: _Truncation, log_norm: torch.Tensor | None
) -> torch.Tensor:
    """Exact sampling for rows whose kept set did not fit the first candidates.

    Rows with top_k take their k best as candidates. The others keep every token at or
    above a floor (top_p's boundary value, min_p's ratio) and race over the full row: no
    sort of the vocabulary, which on CPU costs ~2 ms a row.
    """
    vocab = scaled.shape[1]
    tokens = torch.empty(scaled.shape[0], dtype=torch.int64, device=scaled.device)
    top_k_on = trunc.top_k < vocab
    by_k = top_k_on.nonzero().squeeze(1)
    if by_k.numel():
        sub = trunc.rows(by_k)
        sub_norm = None if log_norm is None else log_norm[by_k]
        width = int(sub.top_k.max())
        tokens[by_k], _ = _sample_top(scaled[by_k], keys[by_k], sub, sub_norm, width)
    by_floor = (~top_k_on).nonzero().squeeze(1)
    return _resample_rows(tokens, by_floor, _sample_above_floor, scaled, keys, trunc, log_norm)


def _resample_rows(
    tokens: torch.Tensor,
    rows: torch.Tensor,
    sample: Callable[..., torch.Tensor],
    scaled: torch.Tensor,
    keys: torch.Tensor,
    trunc: _Truncation,
    log_norm: torch.Tensor | None,
) -> torch.Tensor:
    """`tokens` with `rows` replaced by what `sample` draws for them alone (when every row is
    named, the rows are not copied out first)."""
    if rows.numel() == tokens.numel():
        return sample(scaled, keys, trunc, log_norm)
    if rows.numel():
        sub_norm = None if log_norm is None else log_norm[rows]
        tokens[rows] = sample(scaled[rows], keys[rows], trunc.rows(rows), sub_norm)
    return tokens


def _sample_above_floor(
    scaled: torch.Tensor, keys: torch.Tensor, trunc: _Truncation, log_norm: torch.Tensor | None
) -> torch.Tensor:
    """Race over each full row after dropping the tokens below its floor (overwrites `scaled`)."""
    floor = _floor(scaled, trunc, log_norm)
    masked = scaled.masked_fill_(scaled < floor[:, None], -math.inf)
    return race(masked, keys, None, scaled.shape[1])


def _floor(scaled: torch.Tensor, trunc: _Truncation, log_norm: torch.Tensor | None) -> torch.Tensor:
    """[n] the smallest logit a row keeps under top_p (without top_k) and min_p."""
    floor = torch.full_like(scaled[:, 0], -math.inf)
    if trunc.use_top_p:
        assert log_norm is not None, "top_p needs the full row's logsumexp"
        top_p_floor = _top_p_floor(scaled, log_norm, trunc.top_p)
        floor = torch.where(trunc.top_p < 1.0, top_p_floor, floor)
    if trunc.use_min_p:
        floor = torch.maximum(floor, scaled.amax(dim=-1) + torch.log(trunc.min_p))
    return floor


def _top_p_floor(scaled: torch.Tensor, log_norm: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[n] the logit of the last token top_p keeps, found without sorting the row.

    One pass puts each token's probability into a bin by how far (in 1/8 nats) it lies
    below the row's best logit. With `before[b]` the mass of the bins more likely than b,
    every token in a bin with before < top_p, except the last such bin d, is kept, and every
    token past d is dropped:

        bin:     0 .. d-1 | d          | d+1 ..
                 kept     | undecided  | dropped      (before[d] < top_p <= before[d+1])

    Only bin d's tokens are then ranked exactly (a topk over them alone), continuing the
    running mass from before[d].
    """
    # Rows without top_p get a tiny one: their (ignored) answer then costs nothing.
    top_p = torch.where(top_p < 1.0, top_p, _TINY_P)
    bins = _BINS_PER_NAT * (scaled.amax(dim=-1, keepdim=True) - scaled)
    bins = bins.clamp_(max=_BINS - 1).long()  # the last bin also takes the far tail
    probs = (scaled - log_norm).exp_()
    mass = torch.zeros(scaled.shape[0], _BINS, dtype=probs.dtype, device=probs.device)
    mass.scatter_add_(1, bins, probs)
    before = mass.cumsum(dim=1) - mass
    boundary = ((before < top_p[:, None]).sum(dim=1) - 1)[:, None]
    undecided = bins == boundary
    width = int(undecided.sum(dim=1).max())  # NOTE: a device sync.
    candidates = torch.where(undecided, scaled, -math.inf)
    values, _ = candidates.topk(max(width, 1), dim=-1)
    ranked = (values - log_norm).exp_()
    mass_before = before.gather(1, boundary) + ranked.cumsum(dim=1) - ranked
    kept = (mass_before < top_p[:, None]).sum(dim=1, keepdim=True)
    # NOTE: kept >= 1 whenever bin d holds a token; an empty bin d (top_p so close to 1
    # that float rounding leaves the total short of it) keeps everything.
    floor = values.gather(1, (kept - 1).clamp_(min=0)).squeeze(1)
    return torch.where(kept.squeeze(1) > 0, floor, -math.inf)
