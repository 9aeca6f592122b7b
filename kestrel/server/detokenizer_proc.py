"""The detokenizer process: token ids in, text deltas out, stop strings found here.

Input (its inbox, PULL): `TokenBatch`es from the engine, plus `EngineReady` / `EngineStats`, which
it forwards unchanged to the API process (so they arrive in order with the text). Output: one
`TextBatch` per `TokenBatch` to the API process, `RequestFailed` forwarded, and `AbortRequests` to
the engine for requests whose stop string matched.

Owns one `IncrementalDetokenizer` per live request, created from the request's `AddRequest`
(which the engine forwards in `TokenBatch.started`) and dropped when the request finishes, is
aborted or matches a stop string. Tokens for ids it does not know (an abort crossed a step) are
ignored. No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
import zmq

from kestrel.frontend.detokenizer import IncrementalDetokenizer
from kestrel.messages import (AbortRequests, AddRequest, EngineReady, EngineStats, PositionLogprobs,
                              RequestFailed, TextBatch, TextDelta, TokenBatch, TopLogprob, decode, encode)
from kestrel.outputs import EngineOutput, TokenLogprobs
from kestrel.server.child import init_child_process, parent_is_alive
from kestrel.server.config import IpcAddresses

logger = logging.getLogger(__name__)

_POLL_MS = 1000


def run_detokenizer_process(tokenizer_path: str, addrs: IpcAddresses, log_level: str) -> None:
    """Process entry point: load the tokenizer, then detokenize until the parent goes away."""
    init_child_process("detokenizer", log_level)
    from kestrel.frontend.tokenizer import load_tokenizer  # imports transformers: only in this process

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(addrs.detokenizer_inbox)
    to_api = ctx.socket(zmq.PUSH)
    to_api.connect(addrs.api_inbox)
    to_engine = ctx.socket(zmq.PUSH)
    to_engine.connect(addrs.engine_inbox)
    tokenizer = load_tokenizer(tokenizer_path)
    logger.info("tokenizer loaded from %s", tokenizer_path)
    detokenizer = Detokenizer(tokenizer)
    while parent_is_alive():
        if not inbox.poll(_POLL_MS):
            continue
        try:
            message = decode(inbox.recv())
        except msgspec.MsgspecError as e:
            logger.error("dropped a malformed message: %s", e)
            continue
        if isinstance(message, TokenBatch):
            result = detokenizer.process(message)
            if result.to_abort:
                to_engine.send(encode(AbortRequests(result.to_abort)))
            for failure in (*message.failed, *result.failed):
                to_api.send(encode(failure))
            if result.deltas:
                to_api.send(encode(TextBatch(result.deltas)))
        elif isinstance(message, (EngineReady, EngineStats, RequestFailed)):
            to_api.send(encode(message))
        else:
            logger.error("unexpected message %s", type(message).__name__)


class BatchResult(NamedTuple):
    """What one TokenBatch turns into."""

    deltas: list[TextDelta]
    to_abort: list[str]
    """Requests the engine must stop: their stop string matched (or they failed here)."""
    failed: list[RequestFailed]


@dataclass(slots=True)
class _Live:
    """One request being detokenized."""

    detok: IncrementalDetokenizer
    num_logprobs: int | None
    """Top alternatives per position the request asked for; None: no logprobs."""


class Detokenizer:
    """Turns token batches into text batches; holds the per-request state."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._live: dict[str, _Live] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode_one = ((lambda t: backend.decode([t], skip_special_tokens=False)) if backend is not None
                            else (lambda t: tokenizer.decode([t], skip_special_tokens=False)))

    @property
    def num_live(self) -> int:
        return len(self._live)

    def process(self, batch: TokenBatch) -> BatchResult:
        """Apply one engine batch: text deltas, ids to abort in the engine, requests that failed here."""
        for add in batch.started:
            self._start(add)
        for failure in batch.failed:
            self._live.pop(failure.request_id, None)
        for request_id in batch.aborted:
            self._live.pop(request_id, None)
        result = BatchResult([], [], [])
        for out in batch.outputs:
            try:
                delta = self._on_output(out)
            except Exception as e:  # one request's bad bytes must not stop the others
                logger.exception("cannot detokenize request %s", out.request_id)
                self._live.pop(out.request_id, None)
                result.failed.append(RequestFailed(out.request_id, f"detokenizer error: {e}", False))
                if out.finish_reason is None:
                    result.to_abort.append(out.request_id)
                continue
            if delta is None:
                continue
            result.deltas.append(delta)
            if delta.finish_reason == "stop" and isinstance(delta.stop_reason, str) and out.finish_reason is None:
                result.to_abort.append(out.request_id)
        return result

    def _start(self, add: AddRequest) -> None:
        p = add.params
        detok = IncrementalDetokenizer(self._tokenizer, add.prompt_token_ids, p.stop, p.skip_special_tokens,
                                       p.include_stop_str_in_output)
        self._live[add.request_id] = _Live(detok, p.logprobs)

    def _on_output(self, out: EngineOutput) -> TextDelta | None:
        live = self._live.get(out.request_id)
        if live is None:
            return None  # aborted or already stopped; the engine had not heard yet
        delta = live.detok.add_tokens(out.new_token_ids)
        text, finish_reason, stop_reason = delta.text, None, None
        if delta.stop_str is not None:
            finish_reason, stop_reason = "stop", delta.stop_str
        elif out.finish_reason is not None:
            text += live.detok.flush()
            finish_reason = "stop" if live.detok.is_stopped else out.finish_reason
            stop_reason = live.detok.stop_str if live.detok.is_stopped else out.stop_token_id
        if finish_reason is not None:
            del self._live[out.request_id]
        logprobs = None
        if live.num_logprobs is not None and out.new_logprobs:
            logprobs = [self._position(record, token_id, live.num_logprobs)
                        for record, token_id in zip(out.new_logprobs, out.new_token_ids)]
        return TextDelta(out.request_id, text, list(out.new_token_ids), logprobs, finish_reason, stop_reason)

    def _position(self, record: TokenLogprobs, chosen_id: int, num_top: int) -> PositionLogprobs:
        chosen = record.get(chosen_id)
        chosen_lp = chosen.logprob if chosen is not None else float("-inf")
        ranked = sorted((lp.rank, token_id, lp.logprob) for token_id, lp in record.items())
        top = [TopLogprob(token_id, self._decode_one(token_id), logprob)
               for rank, token_id, logprob in ranked if rank <= num_top][:num_top]
        return PositionLogprobs(TopLogprob(chosen_id, self._decode_one(chosen_id), chosen_lp), top)
