"""The step batch: what the engine hands its worker(s) for one step, and what comes back.

The engine (scheduler + requests) describes a step in plain data; a worker (model, KV pool, slot
table, attention, sampler) runs it. Both types are frozen msgspec Structs of plain values, so the
same `StepBatch` is used in-process and crosses a process boundary as bytes (`encode` / `decode`):
each tensor-parallel rank will receive it as a message. No torch here.

Layout of a step of R requests and T tokens (the flat "nopad" batch):

    token_ids, positions, slot_mapping   [T]     request r owns [query_start_loc[r], query_start_loc[r+1])
    query_start_loc                      [R + 1]
    seq_lens, req_rows                   [R]     positions with KV after the step; row in the slot table
    sample_indices, sample_rows          [S]     flat token whose logits are sampled, and how

The worker keeps the request->slot table on its device; `table_writes` carries only the entries
that changed since the last step (new slots, prefix-cache hits), never the whole table.
"""

from __future__ import annotations

import msgspec

from kestrel.sampling_params import SamplingParams


class TableWrites(msgspec.Struct, frozen=True, array_like=True):
    """Entries to set in the worker's slot table: table[rows[i], positions[i]] = slots[i]."""

    rows: list[int]
    positions: list[int]
    slots: list[int]

    def __len__(self) -> int:
        return len(self.slots)


class SampleRow(msgspec.Struct, frozen=True, array_like=True):
    """How to sample one request's next token this step."""

    request_id: str
    """Key of the worker's per-request state (its seeded generator)."""
    params: SamplingParams
    blocked_token_ids: list[int]
    """Ids that must not be sampled this step (EOS and stop ids before min_tokens)."""
    prompt_token_ids: list[int] | None = None
    """Sent only when a repetition penalty needs them."""
    output_token_ids: list[int] | None = None
    """Sent only when a penalty needs them."""
    token_bitmask: bytes | None = None
    """Grammar-constrained rows: the tokens allowed next, bit i of int32 word i // 32 (little-endian) for
    token i, [ceil(vocab / 32)] words; None: any token."""


class StepBatch(msgspec.Struct, frozen=True, array_like=True):
    """One engine step, as data (see the module docstring for the shapes)."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    req_rows: list[int]
    table_writes: TableWrites
    sample_indices: list[int]
    sample_rows: list[SampleRow]
    finished_request_ids: list[str]
    """Requests that ended since the last batch: the worker drops their state."""
    uses_previous_tokens: bool = False
    """Some token_ids are placeholders -(1 + i): the i-th token the previous step sampled (async scheduling)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> list[int]:
        loc = self.query_start_loc
        return [loc[i + 1] - loc[i] for i in range(len(loc) - 1)]

    @property
    def is_decode_only(self) -> bool:
        """Every request computes exactly one token (a CUDA-graph-able step)."""
        return self.num_tokens == self.num_reqs


class StepResult(msgspec.Struct, frozen=True, array_like=True):
    """The sampled tokens of one step, in `sample_rows` order.

    The logprob fields are None when no row asked for logprobs; otherwise every row has
    1 + max_k columns (the sampled token first, then the top-k, best first) and the caller slices.
    """

    token_ids: list[int]
    """[S] the sampled tokens."""
    logprobs: list[list[float]] | None = None
    """[S, 1 + max_k] raw-distribution log-probabilities."""
    logprob_token_ids: list[list[int]] | None = None
    """[S, 1 + max_k] their token ids."""
    ranks: list[int] | None = None
    """[S] rank of the sampled token (1 = most likely)."""


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(StepBatch)
_result_decoder = msgspec.msgpack.Decoder(StepResult)


def encode(value: StepBatch | StepResult) -> bytes:
    return _encoder.encode(value)


def decode_batch(data: bytes) -> StepBatch:
    return _batch_decoder.decode(data)


def decode_result(data: bytes) -> StepResult:
    return _result_decoder.decode(data)
