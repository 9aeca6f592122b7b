"""GPU correctness checks of the Kestrel engine (run by benchmarks/gpu/run.sh on a CUDA machine).

1. bf16 logits of a small random Llama against Hugging Face transformers on the GPU: Kestrel
   generates 32 greedy tokens for several prompts; transformers, teacher-forced on the same tokens,
   must pick the same token at >= 99% of the positions. Random weights give near-flat
   distributions, where bf16 rounding alone flips near-ties, so the same agreement is also shown for
   transformers bf16 against transformers fp32 (the noise floor) and for Kestrel fp32 against
   transformers fp32 (exactness of the kernels, which should be ~1.0).
2. CUDA graphs against eager: identical greedy tokens (bf16, the 32 prompts at once).
3. A batch against one-at-a-time runs in bf16: the first generated token (no earlier divergence can
   carry over) and whole sequences.

Prints one line per check and writes JSON to --out. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile

import torch
import transformers

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams


def _small_llama(path: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.04,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
                                   tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def _generate(engine: Engine, prompts: list[list[int]], params: SamplingParams, one_at_a_time=False):
    out: dict[str, list[int]] = {}
    groups = [[i] for i in range(len(prompts))] if one_at_a_time else [list(range(len(prompts)))]
    for group in groups:
        for i in group:
            engine.add_request(str(i), prompts[i], params)
            out[str(i)] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no CUDA graphs there)")
    parser.add_argument("--num-prompts", type=int, default=32)
    args = parser.parse_args()
    dev = args.device
    results: dict = {}
    ok = True
    with tempfile.TemporaryDirectory() as path:
        _small_llama(path)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(16, 200))]
                   for _ in range(args.num_prompts)]
        greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        common = dict(model=path, show_progress=False, dtype="bfloat16", device=dev, max_model_len=1024,
                      num_kv_slots=32 * 1024, max_num_seqs=32)
        engine = Engine(EngineConfig(**common))
        graphs = _generate(engine, prompts, greedy)
        alone = _generate(engine, prompts, greedy, one_at_a_time=True)
        del engine
        eager = _generate(Engine(EngineConfig(**common, enforce_eager=True)), prompts, greedy)
        fp32 = _generate(Engine(EngineConfig(**{**common, "dtype": "float32"})), prompts, greedy)

        hf = {dt: transformers.LlamaForCausalLM.from_pretrained(path, dtype=dt).to(dev).eval()
              for dt in (torch.bfloat16, torch.float32)}
        agree = {dt: 0 for dt in hf}
        hf_noise = fp32_agree = total = 0
        with torch.no_grad():
            for prompt, generated, generated32 in zip(prompts, graphs, fp32):
                ids = torch.tensor([prompt + generated], device=dev)
                top = {}
                for dt, model in hf.items():
                    top[dt] = model(ids).logits[0, len(prompt) - 1: -1].argmax(-1).cpu()  # each generated token
                    agree[dt] += int((top[dt] == torch.tensor(generated)).sum())
                hf_noise += int((top[torch.bfloat16] == top[torch.float32]).sum())
                ids32 = torch.tensor([prompt + generated32], device=dev)
                top32 = hf[torch.float32](ids32).logits[0, len(prompt) - 1: -1].argmax(-1).cpu()
                fp32_agree += int((top32 == torch.tensor(generated32)).sum())
                total += len(generated)
        top1_bf16 = agree[torch.bfloat16] / total
        top1_fp32 = agree[torch.float32] / total
        same_graphs = graphs == eager
        batch_agree = sum(x[0] == y[0] for x, y in zip(graphs, alone)) / len(prompts)
        results = {"top1_vs_hf_bf16": top1_bf16, "top1_vs_hf_fp32": top1_fp32,
                   "hf_bf16_vs_hf_fp32_top1": hf_noise / total, "kestrel_fp32_vs_hf_fp32_top1": fp32_agree / total,
                   "batch_vs_alone_identical_sequences": sum(x == y for x, y in zip(graphs, alone)) / len(prompts),
                   "cuda_graphs_equal_eager": same_graphs,
                   "graph_vs_eager_token_agreement": sum(a == b for x, y in zip(graphs, eager)
                                                         for a, b in zip(x, y)) / total,
                   "batch_vs_alone_first_token_agreement": batch_agree, "num_positions": total}
        checks = [("top-1 vs HF transformers bf16 >= 0.99", top1_bf16 >= 0.99),
                  ("Kestrel fp32 vs HF fp32 top-1 >= 0.99", fp32_agree / total >= 0.99),
                  ("CUDA graphs == eager (greedy tokens)", same_graphs),
                  ("batch vs one-at-a-time first token >= 0.99", batch_agree >= 0.99)]
    for name, passed in checks:
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
