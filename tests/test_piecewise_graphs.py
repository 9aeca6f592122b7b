"""Mixed steps through the piecewise runner (worker/piecewise_graphs.py) give the plain forward's tokens.

On a CPU the runner uses `eager_capture`, which keeps a graph's contract (each piece's outputs live in
fixed buffers that every replay overwrites), so this checks the plumbing a GPU run relies on: static
inputs, padding rows, the attention between pieces, buckets reused across steps. The GPU test of real
CUDA graphs is test_triton_backend.py::test_cuda_graphs_give_the_eager_greedy_tokens (mixed steps included).
"""

from __future__ import annotations

import random

import pytest

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams
from kestrel.worker.piecewise_graphs import BUCKET, PiecewiseGraphRunner, eager_capture

from engine_runs import run_tokens


def test_mixed_steps_through_the_pieces_give_the_plain_forwards_tokens(tiny_llama_dir):
    rng = random.Random(8)
    prompts = {f"r{i}": [rng.randrange(3, 128) for _ in range(n)] for i, n in enumerate([1, 70, 23, 5, 130, 9])}
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    common = dict(model=tiny_llama_dir, show_progress=False, dtype="float32", device="cpu",
                  max_num_batched_tokens=100, max_num_seqs=4)
    reference = run_tokens(Engine(EngineConfig(**common)), prompts, greedy)

    engine = Engine(EngineConfig(**common))
    worker = engine.executor.worker
    runner = PiecewiseGraphRunner(worker.model, worker.kv_caches, 2 * BUCKET, worker.device, capture=eager_capture)
    worker.mixed_graphs = runner
    sizes: list[int] = []
    run = runner.run

    def counted(token_ids, positions, ctx):
        sizes.append(token_ids.shape[0])
        return run(token_ids, positions, ctx)
    runner.run = counted
    assert run_tokens(engine, prompts, greedy) == reference
    assert len(sizes) >= 3 and max(sizes) > BUCKET  # several mixed steps, in both buckets
    assert sorted(runner._buckets) == [BUCKET, 2 * BUCKET]


def test_mixed_graph_max_tokens_must_be_a_multiple_of_the_bucket():
    with pytest.raises(ValueError, match="mixed_graph_max_tokens must be a multiple of 64"):
        EngineConfig(mixed_graph_max_tokens=100)
