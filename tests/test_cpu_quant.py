"""Quantized CPU decode (`--cpu-quantized-decode`): formats, kernels, loading, engine, flag checks.

- GGUF Q4_0 / Q4_1 blocks read as int4 codes are the gguf package's dequantized weights exactly
  with fp32 scales, and within the bf16 rounding of the scales/zeros as the kernel reads them (q/k
  rows unpermuted like the float weights).
- The int4 and int8 kernels compute x @ W.T of their dequantized weights (bf16 activations and
  output); a packed linear uses them for a few rows only and its fp32 weight beyond; a refined LM
  head gives its top logits in fp32.
- An engine with the flag (tiny GGUF: int4 layers, the padded int4 head; tiny HF model: int8) runs
  eager and compiled; the bundled SmolLM2 keeps most greedy tokens of the fp32 path.
- The flag is refused where it cannot work.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.kernels.cpu_linear import PackedLinear
from kestrel.kernels.cpu_quant import (GROUP_SIZE, Int4Linear, Int4Weight, Int8Linear, quantize_int4, quantize_int8)
from kestrel.models.gguf_loader import read_gguf
from kestrel.sampling_params import SamplingParams
from tests.conftest import make_tiny_hf_model
from tests.test_gguf import _tiny_model, _write_gguf

BF16_REL = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding is within 2^-9 relative; margin x2


def _tiny_q4_gguf(tmp_path, qtype, head_qtype=None):
    """A tiny llama GGUF (hidden 64) with its 2-D weights in `qtype`, the embedding Q8_0."""
    config, tensors = _tiny_model(tmp_path, "llama", tie_word_embeddings=False)
    qtypes = {name: qtype for name, t in tensors.items() if t.dim() == 2}
    qtypes["model.embed_tokens.weight"] = Q.Q8_0
    qtypes["lm_head.weight"] = head_qtype or qtype
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(path, "llama", config, tensors, qtypes=qtypes)
    return str(path)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_gguf_q4_blocks_are_the_dequantized_weights(tmp_path, qtype):
    ckpt = read_gguf(_tiny_q4_gguf(tmp_path, qtype))
    floats = dict(ckpt.iter_weights())
    int4 = dict(ckpt.iter_int4_weights())
    # every 2-D Q4 tensor (q/k permuted in the file), not the Q8_0 embedding
    assert len(int4) == 7 * 2 + 1 and "model.embed_tokens.weight" not in int4
    for name, w in int4.items():
        expected = floats[name]
        assert w.codes.dtype == torch.uint8 and int(w.codes.max()) <= 15
        assert torch.equal(w.dequantize(bf16_params=False), expected), name
        # bf16 scales and zeros: |error| <= (|q - 8| |scale| + |zero|) * 2^-8 per weight
        bound = ((w.codes.float() - 8).abs() * w.scales.repeat_interleave(GROUP_SIZE, 1).abs()
                 + w.zeros.repeat_interleave(GROUP_SIZE, 1).abs()) * BF16_REL
        err = (w.dequantize() - expected).abs()
        assert bool((err <= bound + 1e-12).all()), (name, float(err.max()))


def test_int4_kernel_and_int8_kernel_compute_their_weights():
    torch.manual_seed(0)
    n, k = 200, 96  # n not a multiple of 16: the int4 kernel pads its rows
    weight = torch.randn(n, k) * 0.05
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    int4 = Int4Weight(codes, torch.rand(n, k // GROUP_SIZE) * 0.01, torch.randn(n, k // GROUP_SIZE) * 0.01)
    int8 = quantize_int8(weight)
    assert (int8.dequantize() - weight).abs().max() <= weight.abs().amax(1).max() / 254 * (1 + BF16_REL)
    x = torch.randn(3, k)
    for kernel, w in ((Int4Linear(int4), int4.dequantize()), (Int8Linear(int8), int8.dequantize())):
        got = kernel(x)
        assert got.dtype == torch.float32 and got.shape == (3, n)
        expected = x.bfloat16().float() @ w.t()
        torch.testing.assert_close(got, expected, rtol=BF16_REL, atol=BF16_REL * float(expected.abs().max()))


def test_int4_rounding_is_within_half_a_step_of_each_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 96) * 0.05
    weight[3, :32] = 0.25  # a constant group: scale 0, every code the same
    int4 = quantize_int4(weight)
    assert int4.codes.dtype == torch.uint8 and int(int4.codes.max()) <= 15
    step = int4.scales.repeat_interleave(GROUP_SIZE, dim=1)  # [N, K]
    error = (int4.dequantize(bf16_params=False) - weight).abs()
    assert bool((error <= step / 2 * (1 + 2 * BF16_REL) + 1e-7).all())
    assert torch.equal(int4.dequantize(bf16_params=False)[3, :32], weight[3, :32])


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_linear_runs_few_rows_quantized_and_more_in_fp32(kind):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64) * 0.1, torch.randn(96)
    codes = torch.randint(0, 16, (96, 64), dtype=torch.uint8)
    int4 = Int4Weight(codes, torch.full((96, 2), 0.02), torch.zeros(96, 2))
    if kind == "int4":
        weight = int4.dequantize()  # the same weights in both kernels, as a GGUF Q4 tensor gives
    quantized = int4 if kind == "int4" else quantize_int8(weight)
    kernel = PackedLinear(weight, bias, quantized)
    plain = PackedLinear(weight, bias)
    small = kernel.small.max_rows
    for rows in (1, 2, small):
        x = torch.randn(rows, 64)
        got = kernel.eager(x)
        assert not torch.equal(got, plain.eager(x))  # the quantized kernel ran (bf16)
        # measured max |error| / max |output|: 0.4% (int4, bf16 activations), 0.8% (int8 + its rounding)
        expected = F.linear(x, weight, bias)
        assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())
    x = torch.randn(small + 1, 64)
    assert torch.equal(kernel.eager(x), plain.eager(x))  # more rows: the fp32 packed weight


def test_refined_head_gives_fp32_top_logits():
    torch.manual_seed(0)
    weight = torch.randn(304, 64)
    head = PackedLinear(weight, quantized=quantize_int8(weight), refine_top_k=4)
    x = torch.randn(2, 64)
    logits = head.eager(x)
    exact = F.linear(x, weight)
    top = exact.topk(4, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def _greedy(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [got[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("source", ["gguf_q4_1", "hf"])
def test_engine_runs_quantized_eager_and_compiled(tmp_path, source):
    if source == "hf":
        path = str(tmp_path / "hf")
        make_tiny_hf_model(path, "llama")
        kinds = {"int4": 1, "int8": 8}  # 4 int8 per layer; the head rounded to int4 (its top logits refined)
    else:
        path = _tiny_q4_gguf(tmp_path, Q.Q4_1)
        kinds = {"int4": 9, "int8": 0}  # the head too (vocab 300: padded to 304 in the int4 kernel)
    config = dict(model=path, show_progress=False, num_kv_slots=256, max_num_seqs=4)
    prompts = [[5, 9, 11, 3], [7] * 12, [42, 43, 44]]
    engine = Engine(EngineConfig(**config, cpu_quantized_decode=True))
    model = engine.executor.worker.model
    heads = [m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None]
    got = {"int4": sum(type(k.small).__name__ == "Int4Linear" for k in heads),
           "int8": sum(type(k.small).__name__ == "Int8Linear" for k in heads)}
    assert got == kinds
    eager = _greedy(engine, prompts, 12)
    torch._dynamo.reset()
    compiled = _greedy(Engine(EngineConfig(**config, cpu_quantized_decode=True, compile_decode=True)), prompts, 12)
    assert all(len(t) == 12 for t in eager)
    # Same kernels; only the rows a step pads (a lone request runs as two) and fused rounding differ
    # (measured: all 36 tokens equal).
    same = sum(a == b for x, y in zip(eager, compiled) for a, b in zip(x, y))
    assert same >= 0.75 * 36, (eager, compiled)


def test_smollm2_quantized_keeps_most_greedy_tokens(smollm_llm):
    """The bundled Q4_1 GGUF: int4 layers (its own codes), int8 LM head (its Q8_0), refined logits."""
    from kestrel import LLM

    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.",
               "List three prime numbers.", "How do I reverse a list in Python?",
               "Tell me a short story about a fox.", "What is 17 times 23?", "Give me a tip for learning a language."]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in smollm_llm.chat(conversations, params, use_tqdm=False)]
    quantized = LLM(dtype="float32", show_progress=False, max_model_len=2048, cpu_quantized_decode=True)
    got = [o.outputs[0].token_ids for o in quantized.chat(conversations, params, use_tqdm=False)]
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(reference, got)]
    # Measured (48 tokens): 6 of 8 identical, mean common prefix 89%; broken codes give ~0.
    assert sum(n == 32 for n in prefixes) >= 4, prefixes
    assert sum(prefixes) >= 0.7 * 32 * len(prompts), prefixes


@pytest.mark.parametrize("overrides,message", [
    ({"device": "cuda"}, "CPU only"),
    ({"dtype": "float16"}, "float32 or bfloat16 weights"),
    ({"prepack_weights": False}, "prepack"),
])
def test_flag_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(cpu_quantized_decode=True, **overrides)


def test_flag_parses_and_is_off_by_default():
    import argparse

    from kestrel.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).cpu_quantized_decode is False
    assert engine_config_from_args(parser.parse_args(["--cpu-quantized-decode"])).cpu_quantized_decode is True
