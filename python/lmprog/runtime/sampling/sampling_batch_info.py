"""Per-step sampling state of a batch: the rows' parameters as tensors, plus flags that let
the Sampler skip every feature no row uses.

Built fresh each decode step from plain per-row inputs (`from_rows`); all the Python-side
decisions (which rows are greedy, which truncate, which are still under min_tokens) are
made here on the host, so the Sampler can pick rows without a device sync.

Vocabulary width: `vocab_size` is the number of real tokens. Models whose logits are
padded wider (e.g. to a multiple of 64) get their logits cut to `vocab_size` by the
Sampler, so padding columns are never sampled; token ids >= vocab_size (in prompts,
outputs, EOS, stop or logit_bias ids) are ignored here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lmprog.runtime.host_copy import to_device, to_device_packed
from lmprog.runtime.sampling.penalties import PenaltyInputs, flatten_rows
from lmprog.runtime.sampling.sampling_params import SamplingParams

_U64 = (1 << 64) - 1


@dataclass
class SamplingBatchInfo:
    """Sampling inputs of B rows for one step. Tensors live on `device`.

    Row groups (index tensors, ascending, disjoint):
        greedy_rows: temperature 0: the argmax.
        plain_rows: sampled from the full distribution (no top_k/top_p/min_p).
        truncated_rows: sampled after top_k / top_p / min_p truncation.

    Per-row tensors [B] (greedy rows hold neutral values):
        temperatures (1.0 for greedy rows), top_ks (vocab_size = off), top_ps (1.0 = off),
        min_ps (0.0 = off), seeds (the 64-bit seed as two's-complement int64) and steps
        (tokens generated so far; with the seed it keys the random numbers of this step).
    """

    batch_size: int
    vocab_size: int
    device: torch.device
    greedy_rows: torch.Tensor
    plain_rows: torch.Tensor
    truncated_rows: torch.Tensor
    temperatures: torch.Tensor
    top_ks: torch.Tensor
    top_ps: torch.Tensor
    min_ps: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    # The largest top_k among truncated rows that use one (0 if none), and whether every
    # truncated row uses top_k: then that k alone bounds the candidates.
    max_top_k: int
    all_truncated_use_top_k: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    penalties: PenaltyInputs | None
    # Cells forced to -inf because their row has fewer than min_tokens outputs.
    min_tokens_rows: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None
    # logit_bias of every row that has one, as sparse cells: logits[rows[j], ids[j]] +=
    # values[j]. None when no row has a bias, so such batches pay nothing.
    logit_bias_rows: torch.Tensor | None
    logit_bias_ids: torch.Tensor | None
    logit_bias_values: torch.Tensor | None
    # None: no row wants logprobs. Otherwise the most top logprobs any row asked for
    # (0: only the chosen token's logprob).
    max_logprobs: int | None

    @property
    def is_all_greedy(self) -> bool:
        return self.greedy_rows.numel() == self.batch_size

    @property
    def is_all_sampled(self) -> bool:
        return self.greedy_rows.numel() == 0

    @property
    def need_top_p_top_k(self) -> bool:
        return self.need_top_k or self.need_top_p

    @property
    def need_penalties(self) -> bool:
        return self.penalties is not None

    @property
    def need_min_tokens_mask(self) -> bool:
        return self.min_tokens_rows is not None

    @property
    def need_logit_bias(self) -> bool:
        return self.logit_bias_rows is not None

    @property
    def need_logprobs(self) -> bool:
        return self.max_logprobs is not None

    @classmethod
    def from_rows(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        output_ids: list[list[int]],
        prompt_ids: list[list[int]],
        eos_token_ids: set[int] | list[int],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatchInfo:
        """Build the step's batch. Row i: params[i], its 64-bit seed, the tokens it has
        generated so far (their count is the step) and its prompt tokens."""
        batch = len(params)
        if not batch == len(seeds) == len(output_ids) == len(prompt_ids):
            raise ValueError(
                f"one entry per row expected: {batch} params, {len(seeds)} seeds, "
                f"{len(output_ids)} output_ids, {len(prompt_ids)} prompt_ids"
            )
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        truncated = [i for i, p in enumerate(params) if not p.is_greedy and _truncates(p)]
        plain = [i for i, p in enumerate(params) if not p.is_greedy and not _truncates(p)]
        top_ks = [_top_k(p, vocab_size) for p in params]
        used_ks = [top_ks[i] for i in truncated if top_ks[i] < vocab_size]
        min_rows, min_ids = _min_tokens_cells(params, output_ids, eos_token_ids, vocab_size)
        bias_rows, bias_ids, bias_values = _logit_bias_cells(params, vocab_size)
        requested = [p.logprobs for p in params if p.logprobs is not None]

        # Two host-to-device copies for all rows (host_copy.py): the int64 inputs, the floats.
        dev = torch.device(device)
        greedy_t, plain_t, truncated_t, top_ks_t, seeds_t, steps_t = to_device_packed(
            [greedy, plain, truncated, top_ks, [_as_int64(s) for s in seeds],
             [len(ids) for ids in output_ids]],
            torch.int64,
            dev,
        )  # fmt: skip
        temperatures, top_ps, min_ps = to_device_packed(
            [[1.0 if p.is_greedy else p.temperature for p in params],
             [p.top_p for p in params], [p.min_p for p in params]],
            torch.float32,
            dev,
        )  # fmt: skip
        return cls(
            batch_size=batch,
            vocab_size=vocab_size,
            device=dev,
            greedy_rows=greedy_t,
            plain_rows=plain_t,
            truncated_rows=truncated_t,
            temperatures=temperatures,
            top_ks=top_ks_t,
            top_ps=top_ps,
            min_ps=min_ps,
            seeds=seeds_t,
            steps=steps_t,
            max_top_k=max(used_ks, default=0),
            all_truncated_use_top_k=len(used_ks) == len(truncated) > 0,
            need_top_k=bool(used_ks),
            need_top_p=any(params[i].top_p < 1.0 for i in truncated),
            need_min_p=any(params[i].min_p > 0.0 for i in truncated),
            penalties=PenaltyInputs.from_rows(params, output_ids, prompt_ids, vocab_size, device),
            min_tokens_rows=_maybe_to(min_rows, dev),
            min_tokens_ids=_maybe_to(min_ids, dev),
            logit_bias_rows=_maybe_to(bias_rows, device),
            logit_bias_ids=_maybe_to(bias_ids, device),
            logit_bias_values=_maybe_to(bias_values, device),
            max_logprobs=max(requested) if requested else None,
        )


def _truncates(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _top_k(params: SamplingParams, vocab_size: int) -> int:
    """top_k as a count of kept tokens: vocab_size when off (or larger than the vocabulary)."""
    if params.is_greedy or params.top_k <= 0:
        return vocab_size
    return min(params.top_k, vocab_size)


def _as_int64(seed: int) -> int:
    """The low 64 bits of `seed` as a two's-complement int64 (what an int64 tensor holds)."""
    seed &= _U64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _min_tokens_cells(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: Iterable[int],
    vocab_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rows, ids) of the logits to forbid: EOS and stop_token_ids of every row that has
    generated fewer than min_tokens tokens. EOS is forbidden even with ignore_eos (then
    it would not stop the row, but min_tokens still promises no EOS in the output).
    Returns (None, None) when no row is below its min_tokens."""
    eos = set(eos_token_ids)
    rows = [i for i, p in enumerate(params) if len(output_ids[i]) < p.min_tokens]
    if not rows:
        return None, None
    below = set(rows)
    banned = [
        sorted(eos.union(p.stop_token_ids)) if i in below else [] for i, p in enumerate(params)
    ]
    row_index, ids = flatten_rows(banned, rows, vocab_size)
    if ids.numel() == 0:
        return None, None
    return row_index, ids


def _logit_bias_cells(
    params: Sequence[SamplingParams], vocab_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(rows, ids, biases) CPU tensors of every row's logit_bias, flattened; ids outside
    [0, vocab_size) are dropped (validate_for_model refuses them for requests).
    Returns (None, None, None) when no row has a bias."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            if 0 <= token_id < vocab_size:
                rows.append(i)
                ids.append(token_id)
                values.append(bias)
    if not rows:
        return None, None, None
    return (
        torch.tensor(rows, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(values, dtype=torch.float32),
    )


def _maybe_to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else to_device(tensor, device)
