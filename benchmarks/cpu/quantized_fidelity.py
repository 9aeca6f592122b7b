"""How often the quantized decode path picks the fp32 engine's greedy token, teacher-forced on real text.

    python benchmarks/cpu/quantized_fidelity.py [--streams 8] [--tokens 96] [--json out.json]

`--streams` texts (paragraphs of this repository's docs, tokenized) advance one token a step in lockstep:
at step t every stream sends its first t + 1 tokens as a prompt with max_tokens=1 (greedy). The prefix cache
holds the first t, so each step computes one new token per stream: a step of `--streams` rows, the row
count of a decode batch, on whichever matmul kernel the engine picks for it. The sampled token is the
engine's top-1 at that position given the true text before it; each configuration's top-1 is compared
with the fp32 engine's (no quantization), and with the text's next token. Configurations: bf16 with and
without `--cpu-quantized-decode`, fp32 with it. (At 8 rows on a CPU with AMX, bf16 runs the AMX bf16
kernel; `--cpu-quantized-decode` changes only steps of up to 4 rows there.)
"""

from __future__ import annotations

import argparse
import json
import os
import re

from kestrel.llm import LLM
from kestrel.sampling_params import SamplingParams

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def texts(tokenizer, streams: int, tokens: int) -> list[list[int]]:
    """`streams` token sequences of `tokens` + 1 ids, from the paragraphs of README.md and docs/."""
    paragraphs = []
    for name in ("README.md", "docs/architecture.md"):
        with open(os.path.join(ROOT, name)) as f:
            paragraphs += [p for p in re.split(r"\n\s*\n", f.read()) if len(p) > 400]
    out = []
    for p in paragraphs:
        ids = tokenizer.encode(p)
        if len(ids) > tokens:
            out.append(ids[:tokens + 1])
        if len(out) == streams:
            return out
    raise SystemExit(f"only {len(out)} paragraphs of {tokens + 1} tokens")


def top1(llm: LLM, seqs: list[list[int]], tokens: int) -> list[list[int]]:
    """[stream][t] the engine's greedy token after seqs[stream][:t + 1]."""
    params = SamplingParams(max_tokens=1, temperature=0.0)
    picks = [[] for _ in seqs]
    for t in range(tokens):
        outs = llm.generate([{"prompt_token_ids": s[:t + 1]} for s in seqs], params, use_tqdm=False)
        for i, o in enumerate(outs):
            picks[i].append(o.outputs[0].token_ids[0])
    return picks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--json")
    args = ap.parse_args()
    configs = {"fp32": dict(dtype="float32"),
               "bf16": dict(dtype="bfloat16"),
               "bf16 quantized": dict(dtype="bfloat16", cpu_quantized_decode=True),
               "fp32 quantized": dict(dtype="float32", cpu_quantized_decode=True)}
    seqs, picks = None, {}
    for name, kw in configs.items():
        llm = LLM(max_num_seqs=max(args.streams, 2), **kw)
        if seqs is None:
            seqs = texts(llm.get_tokenizer(), args.streams, args.tokens)
        picks[name] = top1(llm, seqs, args.tokens)
        del llm
    ref = picks["fp32"]
    total = args.streams * args.tokens
    result = {"streams": args.streams, "tokens": args.tokens, "agreement_with_fp32": {}, "agreement_with_text": {}}
    for name, got in picks.items():
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
        text = sum(g[t] == s[t + 1] for s, g in zip(seqs, got) for t in range(args.tokens))
        result["agreement_with_fp32"][name] = round(same / total, 4)
        result["agreement_with_text"][name] = round(text / total, 4)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
