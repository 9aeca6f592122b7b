"""`kestrel` command line: serve, chat, generate, client, bench.

Each sub-command lives in the module that owns it and registers itself with
`add_parser(subparsers)`; its parser's `func` runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kestrel import huge_pages
from kestrel.engine_args import add_engine_args, engine_config_from_args


def _generate(args: argparse.Namespace) -> int:
    from kestrel.llm import LLM
    from kestrel.sampling_params import SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or ["Write a haiku about a kestrel."]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        print(f"--- prompt: {prompt!r}")
        print(out.outputs[0].text)
        print(f"--- ({len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason})")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one-shot generation with the engine in-process")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the chat template (default on)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kestrel", description="Kestrel LLM inference engine")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def _command_modules() -> list:
    from kestrel import chat
    from kestrel.bench import commands as bench_commands
    from kestrel.server import commands as server_commands

    return [bench_commands, server_commands, chat]


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (not a call from Python): huge pages first (kestrel/huge_pages.py)
        huge_pages.reexec_if_wanted()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
