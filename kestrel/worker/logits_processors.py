"""Logits processors: the sampler's hook for changing logits before a token is drawn.

A processor does its host work once per step in `prepare(rows, device)` (None when no row needs
it, so it costs nothing) and changes the float32 logits [num_rows, vocab] in place in `apply_`.
The sampler runs them in order after the raw logprobs are taken and before greedy / random
sampling. Built in: grammar bitmasks (structured outputs: each constrained row's allowed ids, packed),
blocked ids (EOS and stop ids before min_tokens), then repetition / frequency / presence penalties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from kestrel.worker.sampler import Knobs, SamplingRow


class LogitsProcessor(Protocol):
    def prepare(self, rows: Sequence[SamplingRow], device: torch.device) -> object | None:
        """Host work for this step; None when no row needs this processor."""
        ...

    def apply_(self, logits: torch.Tensor, prepared: object, knobs: Knobs) -> None:
        """Change `logits` [num_rows, vocab] (float32) in place."""
        ...


class GrammarBitmask:
    """Sets the ids a row's grammar does not allow to -inf (rows without a bitmask are left alone).

    The engine packs each constrained row's allowed ids as int32 words (bit i % 32 of word i // 32 is
    token i, little-endian). The packed words go to the device as they are (4 bytes per 32 ids, 16 KB
    per row of a 128k vocabulary) and are unpacked there, so no grammar library is needed here.
    """

    def prepare(self, rows: Sequence[SamplingRow], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        constrained = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
        if not constrained:
            return None
        packed = np.frombuffer(b"".join(rows[i].token_bitmask for i in constrained), dtype="<i4")
        words = torch.from_numpy(packed.reshape(len(constrained), -1).copy())  # [C, words] int32
        index = torch.tensor(constrained, dtype=torch.int64)  # [C]
        if device.type == "cuda":
            words, index = words.pin_memory(), index.pin_memory()
        return index.to(device, non_blocking=True), words.to(device, non_blocking=True)

    def apply_(self, logits: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], knobs: Knobs) -> None:
        index, words = prepared
        vocab = logits.shape[1]
        shifts = torch.arange(32, dtype=torch.int32, device=words.device)  # [32]
        blocked = ((words.unsqueeze(-1) >> shifts) & 1).eq(0).flatten(1)  # [C, words * 32]: True = not allowed
        if blocked.shape[1] < vocab:  # ids past the grammar's vocabulary are never allowed
            blocked = torch.nn.functional.pad(blocked, (0, vocab - blocked.shape[1]), value=True)
        blocked = blocked[:, :vocab]  # [C, vocab]
        if len(index) == logits.shape[0]:  # every row is constrained (index is 0..C-1)
            logits.masked_fill_(blocked, float("-inf"))
            return
        rows = logits.index_select(0, index)  # [C, vocab]
        rows.masked_fill_(blocked, float("-inf"))
        logits.index_copy_(0, index, rows)


class BlockedIds:
    """Sets each row's blocked ids to -inf."""

    def prepare(self, rows: Sequence[SamplingRow], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not any(len(row.blocked_token_ids) for row in rows):
            return None
        return _flatten([(row.blocked_token_ids,) for row in rows], device)  # [num_ids] each

    def apply_(self, logits: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], knobs: Knobs) -> None:
        row_idx, token_idx = prepared
        logits[row_idx, token_idx] = float("-inf")


class _PenaltyIds(NamedTuple):
    seen: tuple[torch.Tensor, torch.Tensor] | None
    """(row, token) pairs of prompt + output tokens of rows with a repetition penalty."""
    counted: tuple[torch.Tensor, torch.Tensor] | None
    """(row, token) pairs, one per occurrence, of output tokens of rows with frequency / presence penalties."""


class Penalties:
    """Repetition penalty over prompt + output tokens, then frequency / presence over output tokens.

    Rows with neutral penalties contribute no token ids, so they cost nothing here.
    """

    def prepare(self, rows: Sequence[SamplingRow], device: torch.device) -> _PenaltyIds | None:
        if not any(row.params.has_penalties for row in rows):
            return None
        seen = counted = None
        uses_repetition = [row.params.repetition_penalty != 1 for row in rows]
        if any(uses_repetition):
            seen = _flatten([(row.prompt_token_ids, row.output_token_ids) if uses else ()
                             for uses, row in zip(uses_repetition, rows)], device)
        output_ids = [(row.output_token_ids,) if row.params.frequency_penalty or row.params.presence_penalty else ()
                      for row in rows]
        if any(len(ids) for group in output_ids for ids in group):
            counted = _flatten(output_ids, device)
        return _PenaltyIds(seen, counted)

    def apply_(self, logits: torch.Tensor, prepared: _PenaltyIds, knobs: Knobs) -> None:
        num_rows, vocab = logits.shape
        if prepared.seen is not None:
            seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=logits.device)
            seen[prepared.seen] = True  # [num_rows, vocab]
            penalty = knobs.repetition_penalty.unsqueeze(1)  # [num_rows, 1]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, penalized, logits))
        if prepared.counted is not None:
            row_idx, token_idx = prepared.counted
            counts = torch.zeros(num_rows, vocab, dtype=torch.float32, device=logits.device)
            counts.index_put_(
                (row_idx, token_idx), torch.ones_like(token_idx, dtype=torch.float32), accumulate=True
            )  # [num_rows, vocab]
            logits -= knobs.frequency_penalty.unsqueeze(1) * counts
            logits -= knobs.presence_penalty.unsqueeze(1) * (counts > 0)


DEFAULT_PROCESSORS: tuple[LogitsProcessor, ...] = (GrammarBitmask(), BlockedIds(), Penalties())


def _flatten(
    groups: Sequence[Sequence[Sequence[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row groups of id sequences -> (row index, token id) pairs on `device`, one transfer.

    Lists go through numpy (torch.tensor on a long Python list is several times slower);
    numpy arrays and CPU tensors are used without conversion.
    """
    per_row = [
        np.concatenate([_as_int64(ids) for ids in group]) if group else np.empty(0, np.int64)
        for group in groups
    ]
    lengths = [len(ids) for ids in per_row]
    pairs = np.empty((2, sum(lengths)), dtype=np.int64)  # [2, num_ids]: row index, token id
    if per_row:
        np.concatenate(per_row, out=pairs[1])
        pairs[0] = np.repeat(np.arange(len(per_row), dtype=np.int64), lengths)
    pairs = torch.from_numpy(pairs).to(device, non_blocking=True)  # [2, num_ids]
    return pairs[0], pairs[1]


def _as_int64(ids: Sequence[int]) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64, copy=False).reshape(-1)
    return np.fromiter(ids, dtype=np.int64, count=len(ids))
