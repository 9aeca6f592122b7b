"""Tests of the batched sampler (kestrel/runner/sampler.py) against plain-Python references.

Many independent draws are taken as many identical rows in one call, so each test runs in
milliseconds on CPU.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from kestrel.worker.logits_processors import Penalties
from kestrel.worker.sampler import Knobs, Sampler, SamplerOutput, SamplingRow
from kestrel.sampling_params import SamplingParams


def _row(params: SamplingParams, prompt=(), output=(), blocked=(), generator=None) -> SamplingRow:
    return SamplingRow(params, generator, list(prompt), list(output), list(blocked))


def _repeat(logits: torch.Tensor, params: SamplingParams, num_rows: int, blocked=()):
    """num_rows copies of one row: num_rows independent draws from one distribution."""
    return logits.expand(num_rows, -1), [_row(params, blocked=blocked) for _ in range(num_rows)]


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


# ------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_leaves_input_untouched():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = Sampler(seed=0)(logits, [_row(SamplingParams(temperature=0.0))] * 8)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(logits, before)
    assert out.logprobs is None and out.logprob_token_ids is None and out.ranks is None


def test_greedy_accepts_half_precision_and_breaks_ties_by_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.bfloat16)
    out = Sampler()(logits, [_row(SamplingParams(temperature=0.0))] * 2)
    assert out.token_ids.tolist() == [1, 0]


def test_blocked_ids_are_never_chosen():
    logits = torch.tensor([[4.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    greedy = SamplingParams(temperature=0.0)
    out = Sampler()(logits, [_row(greedy, blocked=[0]), _row(greedy, blocked=[3, 1])])
    assert out.token_ids.tolist() == [1, 0]

    flat = torch.zeros(1, 6)
    many, rows = _repeat(flat, SamplingParams(temperature=1.0), 4000, blocked=[1, 4])
    tokens = Sampler(seed=1)(many, rows).token_ids
    assert not torch.isin(tokens, torch.tensor([1, 4])).any()
    assert set(tokens.tolist()) == {0, 2, 3, 5}


# ------------------------------------------------------------------------------------- filters


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2)) * 3
    sampler = Sampler(seed=2)
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)):
        out = sampler(logits, [_row(params)] * 64)
        assert torch.equal(out.token_ids, logits.argmax(-1)), params


def test_top_k_never_leaves_the_top_k_and_covers_it():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    many, rows = _repeat(logits, SamplingParams(temperature=1.5, top_k=5), 5000)
    tokens = set(Sampler(seed=3)(many, rows).token_ids.tolist())
    assert tokens == top5


def test_top_k_per_row_with_disabled_and_oversized_k():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(11)).expand(3000, -1)
    ks = [0, 3, 100]  # disabled, active, larger than the vocab (= disabled)
    rows = [_row(SamplingParams(temperature=2.0, top_k=ks[i % 3])) for i in range(3000)]
    tokens = Sampler(seed=11)(logits, rows).token_ids
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(tokens[1::3].tolist()) == top3
    assert set(tokens[0::3].tolist()) == set(range(10)) == set(tokens[2::3].tolist())


def test_min_p_filters_unlikely_tokens():
    probs = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])
    many, rows = _repeat(probs.log().unsqueeze(0), SamplingParams(min_p=0.3), 5000)
    tokens = set(Sampler(seed=4)(many, rows).token_ids.tolist())
    assert tokens == {0, 1, 2}  # kept: p >= 0.3 * 0.40 = 0.12


def _reference_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Plain-Python temperature -> min_p -> top_k -> top_p, for one row."""

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
        return [v / sum(e) for v in e]

    scaled = [x / p.temperature for x in logits]
    probs = softmax(scaled)
    scaled = [x if q >= p.min_p * max(probs) else -math.inf for x, q in zip(scaled, probs)]
    if p.top_k > 0:
        kth = sorted(scaled, reverse=True)[p.top_k - 1]
        scaled = [x if x >= kth else -math.inf for x in scaled]
    probs = softmax(scaled)
    mass_above = 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):  # keep while mass above < top_p
        if mass_above >= p.top_p:
            scaled[i] = -math.inf
        mass_above += probs[i]
    return softmax(scaled)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=0.9, top_p=0.75),
        SamplingParams(temperature=1.1, min_p=0.1, top_k=5, top_p=0.9),
    ],
)
def test_sampling_frequencies_match_reference_distribution(params):
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7]])
    expected = torch.tensor(_reference_probs(logits[0].tolist(), params), dtype=torch.float64)
    many, rows = _repeat(logits, params, 20000)
    got = _frequencies(Sampler(seed=5)(many, rows).token_ids, 7)
    # Standard error <= sqrt(0.25 / 20000) = 0.0035; 0.02 is ~6 of them.
    assert (got - expected).abs().max() < 0.02, (got, expected)
    assert (got[expected == 0] == 0).all()


def test_mixed_batch_keeps_each_rows_semantics():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(6))
    rows = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(top_k=1)),
        _row(SamplingParams(temperature=0.0), blocked=[int(logits[2].argmax())]),
        _row(SamplingParams(top_p=1e-6, repetition_penalty=1.0)),
        _row(SamplingParams(temperature=0.0, top_k=3, min_p=0.5)),
        _row(SamplingParams(temperature=1.0, top_k=2)),
    ]
    tokens = Sampler(seed=6)(logits, rows).token_ids
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()
    assert tokens[2] == logits[2].topk(2).indices[1]
    assert tokens[3] == logits[3].argmax() and tokens[4] == logits[4].argmax()
    assert tokens[5] in logits[5].topk(2).indices.tolist()


# ----------------------------------------------------------------------------------- penalties


def _penalize_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """The penalty stage alone, as the sampler runs it."""
    prepared = Sampler().prepare(rows, logits.device)
    knobs = Knobs(*prepared.knob_table.unbind(1))
    Penalties().apply_(logits, Penalties().prepare(rows, logits.device), knobs)


def _reference_penalize(logits: list[float], row: SamplingRow) -> list[float]:
    """Plain-Python blocked ids -> repetition (prompt + output) -> frequency / presence (output)."""
    p = row.params
    out = list(logits)
    for t in row.blocked_token_ids:
        out[t] = -math.inf
    for t in set(row.prompt_token_ids) | set(row.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(row.output_token_ids):
        count = list(row.output_token_ids).count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def _random_penalty_batch(rng: random.Random, num_rows: int, vocab: int) -> list[SamplingRow]:
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(
            temperature=0.0,
            repetition_penalty=rng.choice([1.0, 0.5, 1.3, 2.0]),
            frequency_penalty=rng.choice([0.0, 0.4, -1.0, 2.0]),
            presence_penalty=rng.choice([0.0, 0.7, -0.3, 1.5]),
        )
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        blocked = [rng.randrange(vocab) for _ in range(rng.randrange(0, 3))]
        rows.append(_row(params, prompt, output, blocked))
    return rows


def test_penalties_match_python_reference():
    rng = random.Random(7)
    for trial in range(30):
        rows = _random_penalty_batch(rng, num_rows=6, vocab=20)
        logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(trial)) * 2
        expected = torch.tensor([_reference_penalize(lg, r) for lg, r in zip(logits.tolist(), rows)])

        # The penalty stage alone, exactly (blocked ids are a separate stage: drop them here).
        staged = logits.clone()
        _penalize_(staged, rows)
        no_block = torch.tensor(
            [_reference_penalize(lg, r._replace(blocked_token_ids=())) for lg, r in zip(logits.tolist(), rows)]
        )
        torch.testing.assert_close(staged, no_block)

        # End to end: greedy picks the argmax of the penalized logits.
        tokens = Sampler(seed=trial)(logits, rows).token_ids
        assert torch.equal(tokens, expected.argmax(-1)), trial


def test_repetition_penalty_covers_prompt_but_frequency_and_presence_only_output():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    # Token 0 appears only in the prompt.
    rep = Sampler()(logits, [_row(SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt=[0])])
    assert rep.token_ids.tolist() == [1]  # 3.0 / 1.5 = 2.0 < 2.9
    for params in (
        SamplingParams(temperature=0.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
    ):
        assert Sampler()(logits, [_row(params, prompt=[0, 0, 0])]).token_ids.tolist() == [0]
        assert Sampler()(logits, [_row(params, output=[0])]).token_ids.tolist() == [1]


def test_frequency_penalty_scales_with_count_and_negative_logits_are_multiplied():
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    row = _row(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.3), output=[0, 0, 2])
    staged = logits.clone()
    _penalize_(staged, [row])
    torch.testing.assert_close(staged, torch.tensor([[2.0 / 2 - 0.6, 1.0, -1.0 * 2 - 0.3]]))


def test_token_ids_may_be_lists_arrays_or_tensors():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]] * 3)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0)
    rows = [
        _row(params, prompt=[0], output=[1]),
        SamplingRow(params, None, np.array([0]), np.array([1], dtype=np.int32), np.array([3])),
        SamplingRow(params, None, torch.tensor([0]), torch.tensor([1]), torch.tensor([3])),
    ]
    assert Sampler()(logits, rows).token_ids.tolist() == [2, 2, 2]


# --------------------------------------------------------------------------------------- seeds


def _step_logits(request: int, step: int, vocab: int = 500) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step)) * 0.5


def _run_requests(layout: list[tuple[int, int | None]], num_steps: int, order_seed: int):
    """Sample num_steps steps of the requests (request id, seed); the batch order is shuffled
    every step. Returns {request id: tokens}."""
    sampler = Sampler(seed=order_seed)
    generators = {
        rid: torch.Generator().manual_seed(seed) if seed is not None else None for rid, seed in layout
    }
    params = {rid: SamplingParams(temperature=0.8, top_p=0.95, seed=seed) for rid, seed in layout}
    tokens: dict[int, list[int]] = {rid: [] for rid, _ in layout}
    order = [rid for rid, _ in layout]
    shuffle = random.Random(order_seed)
    for step in range(num_steps):
        shuffle.shuffle(order)
        logits = torch.stack([_step_logits(rid, step) for rid in order])
        rows = [_row(params[rid], [1, 2, 3], tokens[rid], generator=generators[rid]) for rid in order]
        for rid, token in zip(order, sampler(logits, rows).token_ids.tolist()):
            tokens[rid].append(token)
    return tokens


def test_seeded_row_is_independent_of_the_batch():
    alone = _run_requests([(0, 1234)], num_steps=8, order_seed=0)[0]
    crowded = _run_requests([(5, None), (0, 1234), (3, 99), (7, None), (4, 5)], num_steps=8, order_seed=1)
    other_order = _run_requests([(3, 99), (7, None), (0, 1234)], num_steps=8, order_seed=2)
    assert crowded[0] == alone
    assert other_order[0] == alone
    assert crowded[3] == other_order[3]


def test_different_seeds_give_different_tokens():
    tokens = _run_requests([(0, 1), (1, 2)], num_steps=8, order_seed=0)
    same_logits = _run_requests([(0, 2)], num_steps=8, order_seed=0)[0]
    assert tokens[0] != same_logits  # same request logits, other seed


def test_shared_seed_makes_unseeded_rows_reproducible():
    logits = torch.zeros(16, 100)
    rows = [_row(SamplingParams())] * 16
    assert torch.equal(Sampler(seed=9)(logits, rows).token_ids, Sampler(seed=9)(logits, rows).token_ids)


# ------------------------------------------------------------------------------------ logprobs


def test_logprobs_come_from_raw_logits_with_top_k_and_rank():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(10)) * 2
    second = int(logits[0].topk(2).indices[1])
    rows = [
        _row(
            SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.0),
            prompt=[int(logits[0].argmin())],
            blocked=[int(logits[0].argmax())],
        ),
        _row(SamplingParams(temperature=0.5, logprobs=5)),
        _row(SamplingParams(temperature=0.0)),  # asked for nothing: still gets the columns
        _row(SamplingParams(temperature=1.0, top_k=3, logprobs=0)),
    ]
    out = Sampler(seed=10)(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.shape == (4, 6) and out.logprobs.dtype == torch.float32
    assert out.logprob_token_ids.shape == (4, 6) and out.logprob_token_ids.dtype == torch.int64
    assert out.ranks.shape == (4,) and out.ranks.dtype == torch.int64
    assert out.token_ids[0] == second and out.ranks[0] == 2  # the blocked argmax still ranks 1

    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0])
    top = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.logprobs[:, 1:], top.values)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    assert (out.logprobs[:, 1:-1] >= out.logprobs[:, 2:]).all()
    for i, token in enumerate(out.token_ids.tolist()):
        assert out.ranks[i] == 1 + int((raw[i] > raw[i, token]).sum())


def test_logprobs_zero_gives_only_the_sampled_column():
    logits = torch.randn(3, 10)
    out = Sampler()(logits, [_row(SamplingParams(logprobs=0))] + [_row(SamplingParams())] * 2)
    assert out.logprobs.shape == (3, 1) and out.logprob_token_ids.shape == (3, 1)
    assert out.ranks.tolist() == [1 + int((r > r[t]).sum()) for r, t in zip(logits, out.token_ids)]


def test_rejects_logits_that_do_not_match_rows():
    with pytest.raises(ValueError, match="num_rows"):
        Sampler()(torch.zeros(2, 5), [_row(SamplingParams())])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_semantics():
    logits = torch.randn(4, 1000, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=3)),
        _row(SamplingParams(top_k=1, frequency_penalty=0.5), output=[1, 2]),
        _row(SamplingParams(seed=3), generator=gen),
        _row(SamplingParams(temperature=0.0), blocked=[int(logits[3].argmax())]),
    ]
    out = Sampler(seed=0)(logits, rows)
    assert out.token_ids.device.type == "cpu" and out.logprobs.device.type == "cpu"
    assert out.token_ids[0] == logits[0].argmax().cpu()
    assert out.token_ids[3] == logits[3].topk(2).indices[1].cpu()
    alone = Sampler()(
        logits[2:3], [_row(SamplingParams(seed=3), generator=torch.Generator(device="cuda").manual_seed(3))]
    )
    assert alone.token_ids[0] == out.token_ids[2]


def test_top_p_on_a_large_vocabulary_never_leaves_the_nucleus():
    """Top-p by rejection: peaked and flat rows (the nucleus of a flat row has thousands of
    tokens), top_p = 1 untouched; every draw lies in the full-sort reference nucleus."""
    gen = torch.Generator().manual_seed(11)
    vocab = 49152
    logits = torch.randn(4, vocab, generator=gen) * torch.tensor([[4.0], [0.05], [2.0], [1.0]])
    top_p = [0.9, 0.3, 0.5, 1.0]
    rows = [_row(SamplingParams(temperature=1.0, top_p=p)) for p in top_p]
    sampler = Sampler(seed=12)
    def nucleus(r: int, p: float) -> set[int]:
        probs = logits[r].double().softmax(-1)
        order = probs.argsort(descending=True)
        mass_above = probs[order].cumsum(0) - probs[order]
        return set(order[mass_above < p].tolist())

    nuclei = [nucleus(r, p) for r, p in enumerate(top_p)]
    assert len(nuclei[1]) > 1000  # the flat row needs many rounds' worth of tokens
    seen: list[set[int]] = [set() for _ in top_p]
    for _ in range(200):
        for r, t in enumerate(sampler(logits, rows).token_ids.tolist()):
            seen[r].add(t)
    for r in range(3):
        assert seen[r] <= nuclei[r], r
    assert len(seen[1]) > 150  # the flat row is sampled across its nucleus, not stuck on the top token
    assert seen[3] - nucleus(3, 0.5)  # top_p = 1: draws outside what a 0.5 nucleus would keep


def test_greedy_pick_is_argmax_with_ties_and_nan():
    """The greedy fast path (`max(dim)` indices) picks what argmax picks: the first of tied maxima, a NaN."""
    from kestrel.worker.sampler import _greedy

    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    logits[1, 40] = logits[1, 7] = logits[1, 200] = 50.0  # ties: the first index
    logits[2, 99] = float("nan")
    logits[3] = 0.0  # all equal
    logits[4, -1] = float("inf")
    assert _greedy(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert _greedy(logits)[1] == 7 and _greedy(logits)[2] == 99 and _greedy(logits)[3] == 0
