"""Hugging Face transformers `generate` at batch 1 on the GPU: the sanity peer of run.sh.

    python benchmarks/gpu/hf_peer.py --model benchmarks/gpu/llama-3.1-8b [--out hf.json]

Random weights of the config (bf16, on the GPU), 128 prompt tokens, 128 new tokens, greedy; reports
ms per output token (decode steps only, from a streamer's timestamps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers


class _Clock:
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = transformers.AutoConfig.from_pretrained(args.model)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 128), device="cuda")
    for new in (8, 128):  # warm-up, then the timed run
        clock = _Clock()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)
    steps = [b - a for a, b in zip(clock.times[2:], clock.times[3:])]  # after the prompt and the first token
    ms = statistics.fmean(steps) * 1e3
    print(f"hf_transformers_b1_128x128: ms_per_token = {ms:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"hf_b1_128x128_ms_per_token": ms, "transformers": transformers.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
