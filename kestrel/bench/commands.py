"""`kestrel bench offline`, `bench latency` and `bench serve`: flags in, figures printed and saved.

offline: the engine (or Hugging Face transformers, `--backend hf`) in-process
on random prompts, or the shared-prefix and multi-turn workloads of the prefix
cache (see `kestrel.bench.offline`, `kestrel.bench.workloads`). latency: start-up,
prefill and decode-step time of one batch (`kestrel.bench.latency`). serve: a
streaming load generator for any OpenAI-compatible server (see
`kestrel.bench.serve`), on random, file or shared-prefix prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os

from kestrel.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: offline throughput, serving load")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_offline(sub)
    _add_latency(sub)
    _add_serve(sub)


# ---- offline -------------------------------------------------------------------
def _add_offline(sub) -> None:
    p = sub.add_parser("offline", help="throughput of the engine in-process on random prompts",
                       description="Time N random prompts of input-len tokens, output-len generated tokens each "
                                   "(EOS ignored), max-num-seqs at a time, after a short warm-up run.")
    add_engine_args(p)
    p.add_argument("--backend", choices=("kestrel", "hf"), default="kestrel",
                   help="kestrel, or hf: Hugging Face transformers generate() on the same prompts")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1.0 like vLLM's throughput benchmark; 0 = greedy (the hf backend samples when > 0)")
    p.add_argument("--num-warmup-tokens", type=int, default=8,
                   help="output length of the untimed warm-up run over one batch (0 = no warm-up)")
    p.add_argument("--num-iters", type=int, default=1,
                   help="timed runs; the figures are the fastest run's (all elapsed times are saved)")
    p.add_argument("--wait-idle", action="store_true",
                   help="before each timed run, wait until other processes leave the CPUs idle (shared machines)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain every output to the JSON schema in FILE (EOS ends it; --output-len is a cap)")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "multi-turn"), default="random",
                   help="random: --num-prompts x --input-len; shared-prefix: --num-groups x --prompts-per-group "
                        "prompts, a --prefix-len system prompt per group then --input-len own tokens; multi-turn: "
                        "--num-prompts conversations of --num-turns turns, each adding the last answer and "
                        "--input-len new tokens")
    _add_shared_prefix_args(p)
    p.add_argument("--num-turns", type=int, default=10, help="multi-turn: turns per conversation")
    p.add_argument("--output-json", default=None, help="save the figures here")
    p.set_defaults(func=_run_offline)


def _add_shared_prefix_args(p) -> None:
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups (G)")
    p.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: requests per group (R)")
    p.add_argument("--prefix-len", type=int, default=512,
                   help="shared-prefix: tokens of each group's system prompt (P)")


def _run_offline(args: argparse.Namespace) -> int:
    import torch

    from kestrel.bench.offline import OfflineSpec, print_result, run_offline
    from kestrel.bench.workloads import MultiTurn, SharedPrefix

    num_prompts, input_len, shared, multi = args.num_prompts, args.input_len, None, None
    if args.dataset == "shared-prefix":
        shared = SharedPrefix(args.num_groups, args.prompts_per_group, args.prefix_len, args.input_len)
        num_prompts, input_len = shared.num_prompts, args.prefix_len + args.input_len
    elif args.dataset == "multi-turn":
        multi = MultiTurn(args.num_prompts, args.num_turns, args.input_len, args.output_len)
    if args.backend == "hf" and args.dataset != "random":
        raise ValueError("--backend hf runs the random dataset only")
    spec = OfflineSpec(num_prompts=num_prompts, input_len=input_len, output_len=args.output_len,
                       batch_size=args.max_num_seqs, temperature=args.temperature, seed=args.seed,
                       num_warmup_tokens=args.num_warmup_tokens, num_iters=args.num_iters,
                       wait_idle=args.wait_idle, json_schema=_schema_text(args.json_schema),
                       shared_prefix=shared, multi_turn=multi)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.backend == "hf":
        from kestrel.bench.hf_baseline import run_hf

        result = run_hf(getattr(args, "model_flag", None) or args.model, args.dtype, args.load_format, spec)
    else:
        config = engine_config_from_args(args, show_progress=False)
        result = run_offline(config, spec)
    return _report(result, print_result, args.output_json)


# ---- latency -------------------------------------------------------------------
def _add_latency(sub) -> None:
    p = sub.add_parser("latency", help="start-up, prefill and decode-step time of one batch",
                       description="Build the engine (timed), then run batch-size random prompts of input-len "
                                   "tokens to output-len tokens each (EOS ignored), num-iters times.")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--output-json", default=None, help="save the figures here")
    p.set_defaults(func=_run_latency)


def _run_latency(args: argparse.Namespace) -> int:
    from kestrel.bench.latency import print_latency, run_latency
    from kestrel.bench.offline import OfflineSpec

    spec = OfflineSpec(num_prompts=args.batch_size, input_len=args.input_len, output_len=args.output_len,
                       batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                       num_iters=args.num_iters)
    return _report(run_latency(engine_config_from_args(args, show_progress=False), spec), print_latency,
                   args.output_json)


# ---- serve ---------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="streaming load generator for any OpenAI-compatible server",
                       description="Send streaming requests to a running server (Kestrel, vLLM, llama.cpp, ...) "
                                   "and report TTFT, TPOT, ITL and end-to-end latency like `vllm bench serve`.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    p.add_argument("--model", default=None, help="model name for the requests (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf = all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--prompt-file", default=None,
                   help="text file (one prompt per line) or .jsonl with 'prompt' [, 'output_len'] per line")
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random",
                   help="random text, or shared-prefix: --num-groups x --prompts-per-group requests, a "
                        "--prefix-len-token system prompt per group, then --random-input-len tokens of their own "
                        "(--num-prompts is then G x R)")
    _add_shared_prefix_args(p)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for random prompts (default: the bundled SmolLM2 GGUF's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None, help="top_p of every request (default: not sent)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="send the JSON schema in FILE as response_format (EOS ends outputs; ignore_eos is off)")
    p.add_argument("--save-result", default=None, help="save the metrics and per-request data as JSON")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from kestrel.bench import serve

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    spec = serve.ServeSpec(base_url=args.base_url, endpoint=args.endpoint, model=args.model,
                           request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                           temperature=args.temperature, top_p=args.top_p,
                           ignore_eos=args.ignore_eos and not args.json_schema,
                           json_schema=json.loads(_schema_text(args.json_schema)) if args.json_schema else None,
                           seed=args.seed,
                           num_warmups=args.num_warmups, request_timeout_s=args.request_timeout,
                           api_key=args.api_key)
    if args.num_prompts < 1:
        raise ValueError(f"num-prompts must be >= 1, got {args.num_prompts}")
    prompts, warmups = _serve_prompts(args)
    try:
        results, duration, model = asyncio.run(serve.run_serve(spec, prompts, warmups))
    except ConnectionError as e:
        print(f"error: {e}")
        return 1
    metrics = serve.compute_metrics(results, duration)
    serve.print_metrics(metrics, spec)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        print(f"{len(errors)} distinct error(s), e.g.: {errors[0]}")
    if args.save_result:
        workload = {"dataset": "file" if args.prompt_file else args.dataset}
        if workload["dataset"] == "shared-prefix":
            workload.update(num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
                            prefix_len=args.prefix_len, question_len=args.random_input_len)
        _save(args.save_result, json.dumps(serve.result_json(metrics, spec, model, results, workload), indent=2))
    return 0 if metrics.completed else 1


def _schema_text(path: str | None) -> str | None:
    """The JSON text of the schema file (checked to be JSON), or None."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    json.loads(text)
    return text
def _serve_prompts(args: argparse.Namespace):
    """(timed prompts, warm-up prompts: None to warm up on the timed ones)."""
    from kestrel.bench import serve
    from kestrel.bench.workloads import SharedPrefix

    if args.prompt_file:
        return serve.file_prompts(args.prompt_file, args.num_prompts, args.random_output_len), None
    tokenizer = _tokenizer(args.tokenizer)
    if args.dataset == "shared-prefix":
        w = SharedPrefix(args.num_groups, args.prompts_per_group, args.prefix_len, args.random_input_len)
        prompts = serve.shared_prefix_prompts(tokenizer, w, args.random_output_len, args.seed)
        warm_len = args.prefix_len + args.random_input_len
    else:
        prompts = serve.random_prompts(tokenizer, args.num_prompts, args.random_input_len,
                                       args.random_output_len, args.seed)
        warm_len = args.random_input_len
    warmups = serve.random_prompts(tokenizer, max(1, args.num_warmups), warm_len, args.random_output_len,
                                   args.seed + 1)  # sharing nothing with the timed prompts
    return prompts, warmups


def _tokenizer(path: str | None):
    from kestrel.frontend.tokenizer import load_tokenizer

    if path is None:
        from kestrel.model_files import default_model_path

        path = default_model_path()
    return load_tokenizer(path)


def _report(result, printer, path: str | None) -> int:
    """Print a frozen result dataclass, and save it as JSON when a path is given."""
    printer(result)
    if path:
        _save(path, json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def _save(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"saved {path}")
