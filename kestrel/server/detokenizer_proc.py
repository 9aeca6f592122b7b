"""The detokenizer process: token ids in, text deltas out, stop strings found here.

Input (its inbox, PULL): `TokenBatch`es from the engine, plus `EngineReady`, `EngineStats` and
`EngineHeartbeat`, which it forwards unchanged to the API process (so they arrive in order with the text). Output: one
`TextBatch` per `TokenBatch` to the API process, `RequestFailed` forwarded, and `AbortRequests` to
the engine for requests whose stop string matched.

Holds an `OutputProcessor` (the frontend's output rules, shared with the offline `LLM`) with one
entry per live request, created from the request's `AddRequest` (which the engine forwards in
`TokenBatch.started`) and dropped when the request finishes, is aborted or matches a stop string.
Tokens for ids it does not know (an abort crossed a step) are ignored. No torch here.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import msgspec

from kestrel.frontend.output_processor import OutputProcessor
from kestrel.messages import (AbortRequests, EngineHeartbeat, EngineReady, EngineStats, RequestFailed, TextBatch,
                              TextDelta, TokenBatch, decode, encode)
from kestrel.server.child import init_child_process, open_sockets, parent_is_alive
from kestrel.server.config import IpcAddresses

logger = logging.getLogger(__name__)

_POLL_MS = 1000


def run_detokenizer_process(tokenizer_path: str, addrs: IpcAddresses, log_level: str) -> None:
    """Process entry point: load the tokenizer, then detokenize until the parent goes away."""
    init_child_process("detokenizer", log_level)
    from kestrel.frontend.tokenizer import load_tokenizer  # imports transformers: only in this process

    _, inbox, (to_api, to_engine) = open_sockets(addrs.detokenizer_inbox, addrs.api_inbox, addrs.engine_inbox)
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
        elif isinstance(message, (EngineReady, EngineStats, EngineHeartbeat, RequestFailed)):
            to_api.send(encode(message))
        else:
            logger.error("unexpected message %s", type(message).__name__)


class BatchResult(NamedTuple):
    """What one TokenBatch turns into."""

    deltas: list[TextDelta]
    to_abort: list[str]
    """Requests the engine must stop: their stop string matched (or they failed here)."""
    failed: list[RequestFailed]


class Detokenizer:
    """Turns token batches into text batches through one `OutputProcessor`."""

    def __init__(self, tokenizer) -> None:
        self._outputs = OutputProcessor(tokenizer)

    @property
    def num_live(self) -> int:
        return self._outputs.num_live

    def process(self, batch: TokenBatch) -> BatchResult:
        """Apply one engine batch: text deltas, ids to abort in the engine, requests that failed here."""
        for add in batch.started:
            self._outputs.add_request(add.request_id, add.prompt_token_ids, add.params)
        for failure in batch.failed:
            self._outputs.remove(failure.request_id)
        for request_id in batch.aborted:
            self._outputs.remove(request_id)
        result = BatchResult([], [], [])
        for out in batch.outputs:
            try:
                delta = self._outputs.process(out)
            except Exception:  # one request's bad bytes must not stop the others
                logger.exception("cannot detokenize request %s", out.request_id)
                self._outputs.remove(out.request_id)
                result.failed.append(RequestFailed(
                    out.request_id, "internal detokenizer error (the server log has the details)", False))
                if out.finish_reason is None:
                    result.to_abort.append(out.request_id)
                continue
            if delta is None:
                continue
            result.deltas.append(delta)
            if self._outputs.needs_abort(out, delta):
                result.to_abort.append(out.request_id)
        return result
