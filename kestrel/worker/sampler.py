"""Batched sampler: one new token per row from the model's last-position logits.

Owns the step from logits to tokens, in two calls: `prepare(rows)` once per step on the host
(per-row knobs, flags that pick the stages to run, each logits processor's own state: blocked ids,
penalty token ids, later grammar bitmasks), then `sample(logits, prepared)` on the logits' device.
On a GPU the first can run while the forward pass does. Input: logits [num_rows, vocab] (any float
dtype, any device) and one `SamplingRow` per logits row. Output: a `SamplerOutput` with the
sampled token ids on CPU and, when any row asked for them, log-probabilities of the RAW model
distribution (vLLM v1's default).

Pipeline, in vLLM v1 order, all in float32:
    raw logprobs -> logits processors (blocked ids, repetition / frequency / presence penalties, ...)
    -> greedy rows: argmax -> random rows: temperature -> min_p -> top_k -> top_p -> inverse-CDF sample.

Invariant: a random row whose request has a seed draws its uniform from its own generator, one
draw per step, so its tokens depend only on its seed, its logits and its step count, never on
the rest of the batch. Everything else is vectorized over the batch; per-row knobs
travel to the device in one tensor per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kestrel.sampling_params import SamplingParams
from kestrel.worker.logits_processors import DEFAULT_PROCESSORS, LogitsProcessor

_MAX_TOP_P_ROUNDS = 16
"""Rejection rounds for top_p before a still-unsettled row takes its most likely token."""


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    generator: torch.Generator | None
    """The request's own generator (on the logits' device) when params.seed is set, else None."""
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far (for penalties)."""
    blocked_token_ids: Sequence[int] = ()
    """Ids that must not be sampled this step (EOS / stop ids before min_tokens)."""
    token_bitmask: bytes | None = None
    """Grammar-constrained rows: the packed int32 bitmask of the ids allowed this step (`SampleRow`)."""


class SamplerOutput(NamedTuple):
    """Tokens of one step; the logprob fields are None when no row asked for logprobs.

    max_k = max(params.logprobs) over the rows that asked. Rows that asked for fewer
    alternatives (or none) still get max_k columns; the caller slices.
    """

    token_ids: torch.Tensor
    """[num_rows] int64 (on CPU unless `sample(..., to_host=False)`): the sampled tokens."""
    logprobs: torch.Tensor | None
    """[num_rows, 1 + max_k] float32: col 0 the sampled token's, cols 1.. the top-k (descending)."""
    logprob_token_ids: torch.Tensor | None
    """[num_rows, 1 + max_k] int64: col 0 the sampled token, cols 1.. the top-k token ids."""
    ranks: torch.Tensor | None
    """[num_rows] int64: 1 + the number of tokens with a strictly larger raw logprob."""


class Knobs(NamedTuple):
    """The per-row sampling knobs on the device, one [num_rows] float32 tensor each."""

    temperature: torch.Tensor
    """1 for greedy rows, so dividing by it leaves them alone."""
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    is_greedy: torch.Tensor
    """1.0 where the row is greedy (`SamplingParams.is_greedy`, the one definition), else 0.0."""

    @staticmethod
    def host_row(p: SamplingParams) -> list[float]:
        greedy = p.is_greedy
        return [1.0 if greedy else p.temperature, p.top_p, float(p.top_k), p.min_p, p.repetition_penalty,
                p.frequency_penalty, p.presence_penalty, float(greedy)]


class PreparedBatch(NamedTuple):
    """Host-side summary of the rows, made once per step by `Sampler.prepare`."""

    num_rows: int
    knob_table: torch.Tensor | None
    """[num_rows, len(Knobs._fields)] float32 on CPU, `Knobs` columns; None when every row is a plain argmax."""
    all_greedy: bool
    has_min_p: bool
    max_top_k: int
    """Largest top_k over the random rows; 0 when none uses top_k."""
    has_top_p: bool
    seeded_rows: list[tuple[int, torch.Generator]]
    """(row, generator) of the random rows that draw noise from their own generator."""
    max_logprobs: int | None
    """max(params.logprobs) over the rows that asked; None when none did."""
    processors: list[tuple[LogitsProcessor, object]]
    """The logits processors some row needs this step, with what each prepared."""


class Sampler:
    """Samples one token per row. Stateless per request; owns only the shared generator."""

    def __init__(self, seed: int | None = None, processors: Sequence[LogitsProcessor] = DEFAULT_PROCESSORS):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._processors = tuple(processors)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, self.prepare(rows, logits.device))

    def prepare(self, rows: Sequence[SamplingRow], device: torch.device | str = "cpu") -> PreparedBatch:
        """Once per step, on the host: knobs, stage flags and every logits processor's state.

        An all-greedy step with no processor needs only an argmax: no knob table is built.
        """
        device = torch.device(device)
        seeded_rows: list[tuple[int, torch.Generator]] = []
        max_logprobs: int | None = None
        random = [not row.params.is_greedy for row in rows]
        for i, row in enumerate(rows):
            p = row.params
            if row.generator is not None and random[i]:
                seeded_rows.append((i, row.generator))
            if p.logprobs is not None:
                max_logprobs = p.logprobs if max_logprobs is None else max(max_logprobs, p.logprobs)
        processors = [(proc, state) for proc in self._processors
                      if (state := proc.prepare(rows, device)) is not None]
        all_greedy = not any(random)
        table = None
        if not (all_greedy and not processors):
            table = torch.tensor([Knobs.host_row(row.params) for row in rows],
                                 dtype=torch.float32).reshape(len(rows), len(Knobs._fields))
        return PreparedBatch(
            num_rows=len(rows),
            knob_table=table,
            all_greedy=all_greedy,
            has_min_p=any(r and row.params.min_p > 0 for r, row in zip(random, rows)),
            max_top_k=max((row.params.top_k for r, row in zip(random, rows) if r), default=0),
            has_top_p=any(r and row.params.top_p < 1 for r, row in zip(random, rows)),
            seeded_rows=seeded_rows,
            max_logprobs=max_logprobs,
            processors=processors,
        )

    def sample(self, logits: torch.Tensor, batch: PreparedBatch, to_host: bool = True) -> SamplerOutput:
        """Tokens of the rows; `to_host=False` leaves the output tensors on the logits' device."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(
                f"logits must be [num_rows, vocab] with num_rows == len(rows) == {batch.num_rows}, "
                f"got shape {tuple(logits.shape)}."
            )
        raw = logits.float()  # [num_rows, vocab]; never modified (may be the caller's tensor)
        if batch.all_greedy and not batch.processors:
            tokens = _greedy(raw)  # [num_rows]
        else:
            tokens = self._sample(raw, batch)
        out = _make_output(raw, tokens, batch.max_logprobs)
        return SamplerOutput(*(None if t is None else t.cpu() for t in out)) if to_host else out

    def _sample(self, raw: torch.Tensor, batch: PreparedBatch) -> torch.Tensor:
        knobs = Knobs(*batch.knob_table.to(raw.device, non_blocking=True).unbind(1))  # each [num_rows]
        logits = raw.clone()  # [num_rows, vocab]
        for processor, state in batch.processors:
            processor.apply_(logits, state, knobs)
        greedy_tokens = _greedy(logits)  # [num_rows]
        if batch.all_greedy:
            return greedy_tokens
        random_tokens = self._sample_random(logits, knobs, batch)  # [num_rows]
        return torch.where(knobs.is_greedy > 0, greedy_tokens, random_tokens)

    def _sample_random(self, logits: torch.Tensor, knobs: Knobs, batch: PreparedBatch) -> torch.Tensor:
        """Temperature, filters and an inverse-CDF draw, over all rows (greedy rows at T=1)."""
        logits.div_(knobs.temperature.unsqueeze(1))
        if batch.has_min_p:
            _apply_min_p_(logits, knobs.min_p)
        if batch.max_top_k:
            _apply_top_k_(logits, knobs.top_k, batch.max_top_k)
        probs = logits.softmax(dim=-1)  # [num_rows, vocab]
        seeded = dict(batch.seeded_rows)
        tokens = self._draw(probs, None, seeded)
        if batch.has_top_p:
            self._redraw_outside_top_p_(probs, knobs.top_p, knobs.is_greedy == 0, tokens, seeded)
        return tokens

    def _draw(self, probs: torch.Tensor, rows: list[int] | None,
              seeded: dict[int, torch.Generator]) -> torch.Tensor:
        """Inverse-CDF draw of one token per row of `probs` [n, vocab] (rows need not sum to 1).

        `rows` are the batch rows these are (None: all of them, in order); a seeded row draws its
        uniform from its own generator.
        """
        cdf = probs.cumsum(dim=-1)  # [n, vocab]
        u = torch.rand(cdf.shape[0], device=probs.device, generator=self._shared_generator(probs.device))
        position = None if rows is None else {row: i for i, row in enumerate(rows)}
        for row, generator in seeded.items():  # the only per-row loop: one number per seeded row
            i = row if position is None else position.get(row)
            if i is not None:
                u[i] = torch.rand(1, device=probs.device, generator=generator)[0]
        # The first token whose cumulative probability reaches (1 - u) * total, with 1 - u in (0, 1]:
        # token i with probability p_i, and never a token of probability 0 (a flat step of the cdf).
        target = ((1.0 - u) * cdf[:, -1]).unsqueeze(1)  # [n, 1]
        return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=cdf.shape[1] - 1)

    def _redraw_outside_top_p_(self, probs: torch.Tensor, top_p: torch.Tensor, sampled: torch.Tensor,
                               tokens: torch.Tensor, seeded: dict[int, torch.Generator]) -> None:
        """Top-p by rejection, without sorting the vocabulary (25 ms for 16 x 49152 on 2 cores).

        A token is in the nucleus when the tokens strictly more likely than it hold less than top_p
        of the mass. A row whose token is outside draws again with that token and every less likely
        one removed (all outside too), which leaves the nucleus and its relative odds unchanged: the
        accepted token follows the top-p distribution exactly. Rows usually settle in 1-3 rounds.
        `probs` loses the removed tokens; `tokens` is updated in place.
        """
        pending = ((top_p < 1.0) & sampled).nonzero().squeeze(1)  # [P] batch rows still to check
        for _ in range(_MAX_TOP_P_ROUNDS):
            if pending.numel() == 0:
                return
            sub = probs.index_select(0, pending)  # [P, vocab]
            p_token = sub.gather(1, tokens.index_select(0, pending).unsqueeze(1))  # [P, 1]
            above = torch.where(sub > p_token, sub, 0.0).sum(dim=-1)  # [P]
            outside = above >= top_p.index_select(0, pending)
            pending, sub, p_token = pending[outside], sub[outside], p_token[outside]
            if pending.numel() == 0:
                return
            sub.masked_fill_(sub <= p_token, 0.0)
            probs.index_copy_(0, pending, sub)
            tokens.index_copy_(0, pending, self._draw(sub, pending.tolist(), seeded))
        tokens.index_copy_(0, pending, probs.index_select(0, pending).argmax(dim=-1))  # the top token is always in

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()  # non-deterministic
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator



def _make_output(raw: torch.Tensor, tokens: torch.Tensor, max_logprobs: int | None) -> SamplerOutput:
    if max_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    raw_logprobs = raw.log_softmax(dim=-1)  # [num_rows, vocab]
    sampled = tokens.unsqueeze(1)  # [num_rows, 1]
    sampled_logprobs = raw_logprobs.gather(1, sampled)  # [num_rows, 1]
    ranks = (raw_logprobs > sampled_logprobs).sum(dim=-1) + 1  # [num_rows]
    k = min(max_logprobs, raw.shape[1])
    top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)  # [num_rows, k], descending
    logprobs = torch.cat([sampled_logprobs, top_logprobs], dim=1)  # [num_rows, 1 + k]
    token_ids = torch.cat([sampled, top_ids], dim=1)  # [num_rows, 1 + k]
    return SamplerOutput(tokens, logprobs, token_ids, ranks)


# ---------------------------------------------------------------------------------------------
# Filters of random rows. Each works in place on float32 logits [num_rows, vocab].


def _apply_min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    logits.masked_fill_(probs < threshold, float("-inf"))


def _apply_top_k_(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's top_k tokens (0 disables; ties with the k-th are kept) without a full sort."""
    max_top_k = min(max_top_k, logits.shape[1])
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_rows, max_top_k] descending
    k = top_k.long().clamp(1, max_top_k)  # [num_rows]
    kth_largest = top_values.gather(1, (k - 1).unsqueeze(1))  # [num_rows, 1]
    kth_largest.masked_fill_((top_k <= 0).unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < kth_largest, float("-inf"))


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit (argmax's answer, ties and NaN alike): `max(dim)`'s
    indices, which torch's CPU kernel finds 2.7x faster than `argmax` (16 x 49152 fp32, 2 threads: 239 vs
    654 us). [num_rows, vocab] -> [num_rows]"""
    return logits.max(dim=-1).indices
