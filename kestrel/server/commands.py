"""`kestrel serve` (start the OpenAI-compatible server) and `kestrel client` (query a running one).

    kestrel serve [MODEL] --host 127.0.0.1 --port 8000 --served-model-name NAME --api-key KEY ...
    (the key is better given as $KESTREL_API_KEY, which `ps` does not show)
    kestrel client --url http://127.0.0.1:8000 --text "Hello"

Flag names follow `vllm serve`; engine flags come from `kestrel.engine_args`. Neither command
imports torch in this process: the engine process loads the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kestrel.config import EngineConfig
from kestrel.engine_args import add_engine_args, engine_config_from_args
from kestrel.model_files import resolve_model_path

_BUNDLED_NAME = "SmolLM2-135M-Instruct"


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) requests may use (default: the MODEL argument)")
    serve.add_argument("--api-key", default=os.environ.get("KESTREL_API_KEY"),
                       help="require 'Authorization: Bearer <key>' (default: $KESTREL_API_KEY)")
    serve.add_argument("--tool-call-parser", default="auto", choices=("auto", "hermes", "llama3_json", "mistral"),
                       help="format of tool calls in the output (default: read from the chat template)")
    serve.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    _add_reliability_args(serve)
    serve.add_argument("--truncate-chat-history", action="store_true",
                       help="drop the oldest turns (after the system message) of a chat longer than the context "
                            "instead of answering 400; the response header X-Kestrel-Dropped-Messages counts them")
    serve.set_defaults(func=_serve)

    client = subparsers.add_parser("client", help="send one prompt to a running server and stream the answer")
    client.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    client.add_argument("--text", required=True, help="the prompt")
    client.add_argument("--model", default=None, help="model name (default: the server's first model)")
    client.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                        help="use /v1/chat/completions (default) or /v1/completions")
    client.add_argument("--max-tokens", type=int, default=128)
    client.add_argument("--temperature", type=float, default=0.7)
    client.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    client.add_argument("--api-key", default=os.environ.get("KESTREL_API_KEY"))
    client.set_defaults(func=_client)


def _add_reliability_args(serve: argparse.ArgumentParser) -> None:
    """Limits, timeouts, restarts and logging of the server (see `ServerConfig` for each)."""
    serve.add_argument("--allowed-origins", nargs="+", default=[],
                       help="CORS: origins browsers may call the API from (default: none, no CORS headers)")
    serve.add_argument("--max-request-body-mb", type=float, default=16.0,
                       help="larger bodies get 413 without being read (default 16)")
    serve.add_argument("--max-queued-requests", type=int, default=None,
                       help="requests admitted beyond --max-num-seqs; beyond it 503 + Retry-After (default: no limit)")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds a request may take; then it ends with an error and frees its KV")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish (default 30)")
    serve.add_argument("--stall-timeout", type=float, default=120.0,
                       help="/health answers 503 when the engine has work but made no step for this long "
                            "(default 120; 0: off)")
    serve.add_argument("--restart-engine", action="store_true",
                       help="restart a dead engine (in-flight requests fail) instead of exiting with status 1")
    serve.add_argument("--log-requests", action="store_true",
                       help="log each request's prompt and parameters (default: no prompt text in the log)")
    serve.add_argument("--log-stats-interval", type=float, default=10.0,
                       help="seconds between the engine's statistics log lines while busy (0: off)")


def _serve(args: argparse.Namespace) -> int:
    from kestrel.server.config import ServerConfig
    from kestrel.server.launcher import serve

    # torch's default thread count (all cores) is kept: on 2 cores, one engine thread costs ~35% of
    # the throughput at 16 concurrent requests (benchmarks/README.md); --num-threads overrides it.
    config = engine_config_from_args(args)
    server_config = ServerConfig(
        host=args.host, port=args.port,
        served_model_names=tuple(args.served_model_name or [config.model or _BUNDLED_NAME]),
        tokenizer_path=tokenizer_path(config), api_key=args.api_key,
        log_level=getattr(args, "log_level", "INFO"), access_log=not args.disable_uvicorn_access_log,
        log_requests=args.log_requests, log_stats_interval_s=args.log_stats_interval,
        stall_timeout_s=args.stall_timeout, restart_engine=args.restart_engine,
        shutdown_timeout_s=args.shutdown_timeout, max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout, max_request_body_mb=args.max_request_body_mb,
        allowed_origins=tuple(args.allowed_origins), truncate_chat_history=args.truncate_chat_history,
        tool_call_parser=args.tool_call_parser)
    return serve(config, server_config)


def tokenizer_path(config: EngineConfig) -> str:
    """The file or folder to load the tokenizer from: `--tokenizer`, else the model resolved as the
    engine resolves it (FileNotFoundError for a model path the engine could not load either).

    Kept free of torch (the engine's resolver lives with the model loader, which imports it).
    """
    if config.tokenizer is not None:
        return os.path.expanduser(config.tokenizer)
    return resolve_model_path(config.model)


# ---- kestrel client -----------------------------------------------------------------
def _client(args: argparse.Namespace) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per HTTP request

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        model = args.model or _first_model(http)
        body: dict = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                      "stream": args.stream}
        if args.chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.text}]
        else:
            path, body["prompt"] = "/v1/completions", args.text
        if args.stream:
            body["stream_options"] = {"include_usage": True}
            return _stream_answer(http, path, body, args.chat)
        response = http.post(path, json=body)
        if response.status_code != 200:
            return _print_error(response.status_code, response.text)
        data = response.json()
        choice = data["choices"][0]
        print(choice["message"]["content"] if args.chat else choice["text"])
        _print_usage(data.get("usage"), choice.get("finish_reason"))
    return 0


def _first_model(http) -> str | None:
    response = http.get("/v1/models")
    if response.status_code != 200:
        return None
    data = response.json().get("data") or []
    return data[0]["id"] if data else None


def _stream_answer(http, path: str, body: dict, is_chat: bool) -> int:
    finish_reason, usage = None, None
    with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return _print_error(response.status_code, response.read().decode())
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[len("data: "):])
            if "error" in data:
                return _print_error(500, json.dumps(data))
            usage = data.get("usage") or usage
            for choice in data.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
                print(text or "", end="", flush=True)
                finish_reason = choice.get("finish_reason") or finish_reason
    print()
    _print_usage(usage, finish_reason)
    return 0


def _print_usage(usage: dict | None, finish_reason: str | None) -> None:
    if usage:
        print(f"--- {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, "
              f"finish_reason={finish_reason}", file=sys.stderr)


def _print_error(status: int, text: str) -> int:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    print(f"error ({status}): {message}", file=sys.stderr)
    return 1
