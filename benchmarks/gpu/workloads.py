"""The GPU workloads of issue 7 in one process: one engine, every workload, one table.

    python benchmarks/gpu/workloads.py --model benchmarks/gpu/llama-3.1-8b --out $OUT/workloads.json [--only NAME ...]

The model is the Llama-3.1-8B shape with dummy weights (bf16; speed does not depend on weight
values). One engine (max_num_seqs 256, max_model_len 4096) serves every workload, after its
construction is timed (start-up to first token). Random prompt ids, ignore EOS, greedy. Each
workload is run once untimed at a small size (warm-up) and then timed once.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from kestrel.bench.offline import OfflineSpec, random_prompts, run_offline
from kestrel.bench.workloads import MultiTurn, SharedPrefix
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams

# name -> (num_prompts, input_len, output_len, figure)
WORKLOADS = {
    "b1_128x512": (1, 128, 512, "ms_per_token"),
    "b64_128x512": (64, 128, 512, "decode_tok_s"),
    "n2000_256x256": (2000, 256, 256, "output_tok_s"),
    "n500_1024x1024": (500, 1024, 1024, "output_tok_s"),
    "n200_2048x16": (200, 2048, 16, "prompt_tok_s"),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--prefix-cache-workloads", action="store_true",
                        help="also issue 9's GPU workloads: shared prefix (G32 R16 P2048 Q128 O128) with the "
                             "cache on and off (a second engine), and a 10-turn chat")
    parser.add_argument("--shared-prefix", type=int, nargs=5, default=[32, 16, 2048, 128, 128],
                        metavar=("G", "R", "P", "Q", "O"),
                        help="the shared-prefix workload: G groups of R prompts, prefix P, question Q, output O "
                             "(smaller for a CPU smoke run)")
    args = parser.parse_args()
    global _SHARED, _SHARED_OUTPUT
    g, r, p, q, _SHARED_OUTPUT = args.shared_prefix
    _SHARED = SharedPrefix(num_groups=g, prompts_per_group=r, prefix_len=p, question_len=q)
    config = EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", device=args.device,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                          show_progress=False)
    t0 = time.perf_counter()
    engine = Engine(config)
    init_s = time.perf_counter() - t0
    engine.add_request("first", random_prompts(1, 128, engine.model_config.vocab_size, 0)[0],
                       SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    startup_s = time.perf_counter() - t0
    rows = [("startup_to_first_token_s", startup_s, f"engine init {init_s:.1f} s")]
    results: dict = {"startup_to_first_token_s": startup_s, "engine_init_s": init_s,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                     "num_kv_slots": engine.executor.info.num_kv_slots}
    for name, (n, inp, outp, figure) in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        spec = OfflineSpec(num_prompts=n, input_len=inp, output_len=outp, batch_size=args.max_num_seqs,
                           temperature=0.0, num_warmup_tokens=4)
        r = run_offline(config, spec, engine)
        value = {"ms_per_token": r.mean_decode_step_ms, "decode_tok_s": r.decode_tokens_per_s,
                 "output_tok_s": r.output_tokens_per_s,
                 "prompt_tok_s": n * inp / r.elapsed_s}[figure]
        results[name] = {"figure": figure, "value": value, "elapsed_s": r.elapsed_s,
                         "output_tok_s": r.output_tokens_per_s, "mean_ttft_ms": r.mean_ttft_ms,
                         "mean_decode_step_ms": r.mean_decode_step_ms, "decode_tok_s": r.decode_tokens_per_s}
        rows.append((name, value, figure))
        _save(results, args.out)
        print(f"{name}: {figure} = {value:.2f} (elapsed {r.elapsed_s:.2f} s, "
              f"decode step {r.mean_decode_step_ms:.2f} ms)", flush=True)
    if args.prefix_cache_workloads:
        rows += _prefix_cache_on(config, engine, args.max_num_seqs, results, args.out)
        # The cache-off engine needs the GPU memory the first one holds (weights, KV pool, graph pools).
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            print(f"after freeing the first engine: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
                  f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free", flush=True)
        rows += _prefix_cache_off(config, args.max_num_seqs, results, args.out)
    print("=" * 64)
    for name, value, note in rows:
        print(f"{name:<32} {value:>12.2f}   {note}")
    _save(results, args.out)
    return 0


def _save(results: dict, path: str | None) -> None:
    """Written after every workload, so a run stopped at its time limit keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


_SHARED = SharedPrefix(num_groups=32, prompts_per_group=16, prefix_len=2048, question_len=128)
_SHARED_OUTPUT = 128


def _shared_spec(batch: int) -> OfflineSpec:
    return OfflineSpec(num_prompts=_SHARED.num_prompts, input_len=_SHARED.prefix_len + _SHARED.question_len,
                       output_len=_SHARED_OUTPUT, batch_size=batch, temperature=0.0, num_warmup_tokens=4,
                       shared_prefix=_SHARED)


def _shared_row(label: str, r, results: dict, path: str | None) -> tuple:
    results[f"shared_prefix_cache_{label}"] = {"output_tok_s": r.output_tokens_per_s, "elapsed_s": r.elapsed_s,
                                               "mean_ttft_ms": r.mean_ttft_ms, "hit_rate": r.prefix_cache_hit_rate}
    _save(results, path)
    print(f"shared_prefix_cache_{label}: output_tok_s = {r.output_tokens_per_s:.2f} (elapsed {r.elapsed_s:.2f} s, "
          f"hit rate {r.prefix_cache_hit_rate})", flush=True)
    return (f"shared_prefix_cache_{label}", r.output_tokens_per_s, "output_tok_s")


def _prefix_cache_on(config: EngineConfig, engine: Engine, batch: int, results: dict, path: str | None) -> list:
    """Issue 9 on the GPU, cache on (the engine of the other workloads): shared prefix, then a 10-turn chat."""
    rows = [_shared_row("on", run_offline(config, _shared_spec(batch), engine), results, path)]
    turns = MultiTurn(num_conversations=1, num_turns=10, turn_len=100, output_len=32)
    spec = OfflineSpec(num_prompts=1, input_len=100, output_len=32, batch_size=batch, temperature=0.0,
                       num_warmup_tokens=4, multi_turn=turns)
    ttft = run_offline(config, spec, engine).mean_ttft_by_turn_ms
    results["multi_turn_ttft_by_turn_ms"] = ttft
    _save(results, path)
    print("multi_turn_ttft_by_turn_ms: " + " ".join(f"{t:.1f}" for t in ttft), flush=True)
    return rows + [("multi_turn_ttft_last_over_first", ttft[-1] / ttft[0], "ratio")]


def _prefix_cache_off(config: EngineConfig, batch: int, results: dict, path: str | None) -> list:
    """The shared-prefix workload on a second engine built with the prefix cache off."""
    try:
        off = EngineConfig(**{**_fields(config), "enable_prefix_caching": False})
        return [_shared_row("off", run_offline(off, _shared_spec(batch)), results, path)]
    except Exception as e:  # e.g. out of memory: keep the other figures
        results["shared_prefix_cache_off"] = {"error": repr(e)}
        _save(results, path)
        print(f"shared_prefix_cache_off failed: {e!r}", flush=True)
        return []


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
