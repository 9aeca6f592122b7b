"""Command-line flags for `EngineConfig` (names follow `vllm serve`), shared by every command."""

from __future__ import annotations

import argparse

from kestrel.config import ATTENTION_BACKENDS, DTYPES, EXECUTOR_BACKENDS, LOAD_FORMATS, SCHEDULE_POLICIES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument("model", nargs="?", default=None,
                            help="Hugging Face folder or GGUF file (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder/file if not the model's")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when a GPU is visible)")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None,
                        help="memory for the KV cache (default: 1 on CPU; on GPU what --gpu-memory-utilization leaves)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="GPU: fraction of device memory for weights, activations and the KV pool")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs (decode or mixed steps)")
    parser.add_argument("--mixed-graph-max-tokens", type=int, default=512,
                        help="GPU: mixed prefill+decode steps of up to this many tokens replay piecewise CUDA "
                             "graphs (64-token buckets, captured at start-up); a multiple of 64, 0 = off")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="build the next step while this one runs (default: on for CUDA, off on CPU)")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="auto: triton on CUDA, torch elsewhere")
    parser.add_argument("--distributed-executor-backend", default="uni", choices=EXECUTOR_BACKENDS,
                        help="uni: worker in the engine process; mp: in a child process")
    parser.add_argument("--num-kv-slots", type=int, default=None, help="exact KV pool size in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--jump-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="structured outputs: append the tokens a grammar forces without a forward pass each")
    parser.add_argument("--grammar-cache-size", type=int, default=128, help="compiled grammars kept (LRU)")
    parser.add_argument("--no-prepack-weights", dest="prepack_weights", action="store_false",
                        help="CPU: keep torch's default F.linear instead of oneDNN-packed weights")
    parser.add_argument("--compile-decode", action="store_true",
                        help="CPU: run decode steps as one torch.compile'd graph (compiled at start-up)")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="CPU: run prefill and mixed steps with the parts between attention calls "
                             "torch.compile'd (compiled at start-up)")
    parser.add_argument("--cpu-quantized-decode", action="store_true",
                        help="CPU: matmuls of a few rows (decode at small batch) read quantized weights: int4 "
                             "where a GGUF stores Q4_0/Q4_1 (its own codes), int8 per row rounded from the "
                             "float weights otherwise; bf16 activations and scales, so results change slightly "
                             "(default off: exact fp32)")
    parser.add_argument("--disable-radix-cache", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                        action="store_false",
                        help="compute every prompt in full instead of reusing the KV of cached prefixes")
    parser.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--schedule-policy", default="fcfs", choices=SCHEDULE_POLICIES,
                        help="waiting requests in arrival order (fcfs), or longest cached prefix first when "
                             "the queue is long (lpm)")


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    values = dict(
        model=getattr(args, "model_flag", None) or getattr(args, "model", None),
        tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, load_format=args.load_format,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_gb=args.kv_cache_memory_gb,
        num_kv_slots=args.num_kv_slots, seed=args.seed, num_threads=args.num_threads,
        prepack_weights=getattr(args, "prepack_weights", True),
        compile_decode=getattr(args, "compile_decode", False),
        compile_prefill=getattr(args, "compile_prefill", False),
        cpu_quantized_decode=getattr(args, "cpu_quantized_decode", False),
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        mixed_graph_max_tokens=getattr(args, "mixed_graph_max_tokens", 512),
        async_scheduling=args.async_scheduling,
        attention_backend=args.attention_backend, distributed_executor_backend=args.distributed_executor_backend,
        jump_forward=args.jump_forward, grammar_cache_size=args.grammar_cache_size,
        enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
        schedule_policy=getattr(args, "schedule_policy", "fcfs"),
    )
    values.update(overrides)
    return EngineConfig(**values)
