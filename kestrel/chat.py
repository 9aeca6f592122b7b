"""`kestrel chat [MODEL]`: a terminal chat with the engine in-process, streaming tokens as they come.

    $ kestrel chat
    >>> Hello!
    Hi! How can I help you today?
    >>> /clear        (forget the conversation)      >>> /exit   (or Ctrl-D)

`ChatSession` owns the conversation: it renders the history with the model's chat template, runs
one engine request per turn (the `Engine` of an `LLM`, stepped here directly), streams the text
through an `IncrementalDetokenizer` and keeps the answer in the history. Ctrl-C stops the answer
being generated (its KV slots are freed) and keeps the session. When the history no longer fits in
the context, the oldest turns are dropped (the system prompt stays).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import replace

from kestrel.engine_args import add_engine_args, engine_config_from_args
from kestrel.sampling_params import SamplingParams

_HELP = "commands: /clear forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (engine in-process)")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kestrel.llm import LLM  # imports torch: only when the command runs

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.sampling_seed)
    print("loading the model...", file=sys.stderr, flush=True)
    llm = LLM.from_config(engine_config_from_args(args, show_progress=False))
    session = ChatSession(llm.engine, llm.get_tokenizer(), params, args.system)
    print(_HELP, file=sys.stderr)
    session.repl()
    return 0


class ChatSession:
    """One conversation with an in-process engine."""

    def __init__(self, engine, tokenizer, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self.system = system
        self.history: list[dict] = []
        """User and assistant messages so far (the system prompt is added when rendering)."""
        self._ids = itertools.count()

    def clear(self) -> None:
        self.history = []

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> str:
        """Answer one user message, calling `on_text` with each piece of text as it is ready."""
        from kestrel.frontend.output_processor import OutputProcessor

        self.history.append({"role": "user", "content": user_text})
        prompt_ids = self._fit_prompt()
        room = self.engine.max_model_len - len(prompt_ids)
        params = replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        request_id = f"chat-{next(self._ids)}"
        outputs = OutputProcessor(self.tokenizer)
        outputs.add_request(request_id, prompt_ids, params)
        self.engine.add_request(request_id, prompt_ids, params)
        parts: list[str] = []

        def show(text: str) -> None:
            parts.append(text)
            on_text(text)

        try:
            self._generate(request_id, outputs, show)
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            on_text(" [stopped]")
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def repl(self, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> None:
        """Read-eval-print loop until /exit or end of input."""
        write = write or _print_now
        while True:
            try:
                line = read(">>> ").strip()
            except (EOFError, KeyboardInterrupt):
                write("\n")
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/clear":
                self.clear()
                write("(conversation cleared)\n")
            elif line in ("/help", "/?"):
                write(_HELP + "\n")
            elif line:
                try:
                    self.reply(line, write)
                except ValueError as e:
                    write(f"error: {e}")
                write("\n")

    # ---- helpers -------------------------------------------------------------
    def _generate(self, request_id: str, outputs, on_text: Callable[[str], None]) -> None:
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                delta = outputs.process(out)
                if delta is None:
                    continue
                on_text(delta.text)
                if outputs.needs_abort(out, delta):
                    self.engine.abort_request(request_id)
                if delta.finish_reason is not None:
                    return

    def _fit_prompt(self) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns until one token can follow."""
        from kestrel.frontend.chat_history import fit_conversation
        from kestrel.frontend.tokenizer import apply_chat_template

        ids, num_dropped = fit_conversation(
            self.history, lambda messages: apply_chat_template(self.tokenizer, self._system() + messages, True),
            lambda prompt_len: prompt_len < self.engine.max_model_len)
        self.history = self.history[num_dropped:]
        if len(ids) >= self.engine.max_model_len:
            self.history.pop()
            raise ValueError(f"the message is {len(ids)} tokens long; the context holds "
                             f"{self.engine.max_model_len}")
        return ids

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
