"""Compiled CPU prefill and mixed steps (`--compile-prefill`): the eager engine's tokens, one compile.

Tiny random Llama and Qwen2 (q/k/v bias) in fp32; prompts of 1..60 tokens arriving one a step with a
small token budget, so steps are whole prompts, chunks of a prompt with cached context, and chunks
beside decodes. Greedy tokens must equal the eager engine's, the piece must have run, and nothing may
recompile after start-up.
"""

from __future__ import annotations

import random

import pytest
import torch

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from engine_runs import run_staggered
from tests.conftest import make_tiny_hf_model


@pytest.mark.parametrize("arch, compile_decode", [("llama", False), ("qwen2", True)])
def test_compiled_prefill_gives_the_eager_tokens_and_compiles_once(tmp_path, arch, compile_decode):
    path = str(tmp_path / arch)
    make_tiny_hf_model(path, arch)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (60, 1, 23, 9, 41, 2)]
    config = dict(model=path, show_progress=False, max_num_seqs=8, max_num_batched_tokens=24,
                  enable_prefix_caching=False)
    eager = run_staggered(Engine(EngineConfig(**config)), prompts, 12)
    torch._dynamo.reset()
    engine = Engine(EngineConfig(**config, compile_prefill=True, compile_decode=compile_decode))
    runner = engine.executor.worker.compiled_prefill
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_staggered(engine, prompts, 12)
    assert compiled == eager
    assert runner.num_runs > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
