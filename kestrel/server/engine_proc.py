"""The engine process: loads the model, then runs the engine loop until its parent goes away.

    loop: (idle? check KV integrity) -> drain inbox (block only when idle) -> engine.step()
          -> one TokenBatch to the detokenizer -> (about once a second) an EngineHeartbeat

Input (its inbox, a ZMQ PULL socket): `AddRequest`, `AbortRequests`, `GetEngineStats` from the API
process and `AbortRequests` from the detokenizer (stop strings). Output (PUSH to the detokenizer):
`EngineReady` once, then `TokenBatch`es, `EngineStats` replies and `EngineHeartbeat`s, in order.
Metrics and the periodic log line come from `engine_stats.EngineStatsRecorder`.

Contract: no request can kill this process. A request the engine refuses becomes a
`RequestFailed`; if a step raises, every running request fails with an internal error (logged
here; the message sent on says nothing of Python internals), its slots are freed and the loop
goes on. torch is imported here and nowhere else in the server.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace

import msgspec
import zmq

from kestrel.config import EngineConfig
from kestrel.messages import (AbortRequests, AddRequest, EngineReady, EngineStats, GetEngineStats,
                              Message, RequestFailed, TokenBatch, decode, encode)
from kestrel.outputs import EngineOutput
from kestrel.server.child import init_child_process, open_sockets, parent_is_alive
from kestrel.server.config import IpcAddresses, ServerConfig
from kestrel.server.engine_stats import EngineStatsRecorder

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
"""How long an idle engine blocks on its inbox before checking that its parent is alive."""


def run_engine_process(config: EngineConfig, server_config: ServerConfig, addrs: IpcAddresses, ready) -> None:
    """Process entry point: load the model, announce it, run the loop.

    `ready` is the write end of a multiprocessing pipe; the supervisor learns from it that the model
    is loaded.
    """
    init_child_process("engine", server_config.log_level)
    _, inbox, (outbox,) = open_sockets(addrs.engine_inbox, addrs.detokenizer_inbox)
    try:
        from kestrel.engine import Engine  # torch is imported here, in this process only
        from kestrel.frontend.tokenizer import load_tokenizer

        engine = Engine(replace(config, show_progress=False),
                        tokenizer=lambda: load_tokenizer(config.tokenizer or engine.model_path))
    except Exception:
        logger.exception("could not load the model")
        sys.exit(1)
    mc = engine.model_config
    outbox.send(encode(EngineReady(engine.model_path, engine.max_model_len, mc.vocab_size,
                                   engine.kv_manager.num_slots, list(mc.eos_token_ids), config.max_num_seqs)))
    ready.send(True)
    ready.close()
    engine.structured.preload()  # the tokenizer for grammars, while the first requests run
    logger.info("engine ready: %s, max_model_len %d, %d KV slots", engine.model_path,
                engine.max_model_len, engine.kv_manager.num_slots)
    EngineLoop(engine, inbox, outbox, server_config.model_name, server_config.log_stats_interval_s).run()


@dataclass(slots=True)
class _Unsent:
    """What happened since the last TokenBatch went out."""

    started: list[AddRequest] = field(default_factory=list)
    failed: list[RequestFailed] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.started or self.failed or self.aborted)


class EngineLoop:
    """Feeds one `Engine` from a ZMQ inbox and reports every step to the detokenizer."""

    def __init__(self, engine, inbox: zmq.Socket, outbox: zmq.Socket, model_name: str = "kestrel",
                 log_stats_interval_s: float = 0.0) -> None:
        self.engine = engine
        self._inbox = inbox
        self._outbox = outbox
        self._live: set[str] = set()
        """Ids the engine holds (waiting or running)."""
        self._pending = _Unsent()
        self._is_checked = False
        """`check_integrity()` ran since the engine last had work."""
        self._integrity_error: str | None = None
        self._stats = EngineStatsRecorder(engine, model_name, log_stats_interval_s)

    def run(self) -> None:
        while parent_is_alive():
            self.run_once()
        logger.info("parent process is gone; engine exits")

    def run_once(self) -> None:
        """One iteration: check when idle, drain the inbox (wait only when idle), step, emit."""
        is_idle = not self.engine.has_unfinished_requests()
        if is_idle:
            self._check_integrity_once()
        for message in self._receive(block=is_idle):
            try:
                self._handle(message)
            except Exception:  # no message may stop the loop
                logger.exception("error while handling %s", type(message).__name__)
        outputs = self._step() if self.engine.has_unfinished_requests() else []
        self._emit(outputs)
        heartbeat = self._stats.tick()
        if heartbeat is not None:
            self._outbox.send(encode(heartbeat))

    # ---- helpers -------------------------------------------------------------
    def _receive(self, block: bool) -> list[Message]:
        """Every message waiting in the inbox; when `block`, wait up to a second for the first."""
        if block and not self._inbox.poll(_IDLE_POLL_MS):
            return []
        messages = []
        while True:
            try:
                data = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(decode(data))
            except msgspec.MsgspecError as e:
                logger.error("dropped a malformed message: %s", e)

    def _handle(self, message: Message) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                if request_id in self._live:
                    self._live.discard(request_id)
                    self.engine.abort_request(request_id)
                    self._pending.aborted.append(request_id)
        elif isinstance(message, GetEngineStats):
            self._send_stats(message.nonce)
        else:
            logger.error("unexpected message %s", type(message).__name__)

    def _add(self, message: AddRequest) -> None:
        if message.request_id in self._pending.aborted:
            # The detokenizer applies a batch's starts before its aborts: an id aborted and then reused
            # within one drain (a stop string's abort racing a /generate rid sent again) must go out in
            # two batches, or the detokenizer would forget the new request and its caller would hang.
            self._emit([])
        try:
            self.engine.add_request(message.request_id, message.prompt_token_ids, message.params)
        except ValueError as e:
            self._pending.failed.append(RequestFailed(message.request_id, str(e), param=getattr(e, "param", None)))
            return
        except Exception:
            logger.exception("could not add request %s", message.request_id)
            self._abort_quietly(message.request_id)
            self._pending.failed.append(RequestFailed(
                message.request_id, "internal engine error (the server log has the details)", False))
            return
        self._live.add(message.request_id)
        self._pending.started.append(message)
        self._is_checked = False

    def _step(self) -> list[EngineOutput]:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; failing the %d running requests", len(self._live))
            for request_id in sorted(self._live):
                self._abort_quietly(request_id)
                self._pending.failed.append(RequestFailed(
                    request_id, "internal engine error (the server log has the details)", is_user_error=False))
            self._live.clear()
            self._is_checked = False
            return []
        info, elapsed = self.engine.last_step, time.monotonic() - start
        self._stats.on_step(info, elapsed)
        if logger.isEnabledFor(logging.DEBUG):  # `--log-level debug`: one line a step
            logger.debug("step: %d requests, %d tokens (%d prompt), %d new requests, %.1f ms", info.num_requests,
                         info.num_batched_tokens, info.num_prompt_tokens, len(info.queue_times_s), elapsed * 1e3)
        return outputs

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("could not abort request %s", request_id)

    def _emit(self, outputs: list[EngineOutput]) -> None:
        if not outputs and self._pending.is_empty():
            return
        for out in outputs:
            if out.finish_reason is not None:
                self._live.discard(out.request_id)
        p = self._pending
        self._outbox.send(encode(TokenBatch(p.started, p.failed, p.aborted, outputs)))
        self._pending = _Unsent()

    def _check_integrity_once(self) -> None:
        if self._is_checked:
            return
        self._is_checked = True
        try:
            self.engine.check_integrity()
            self._integrity_error = None
        except AssertionError as e:
            self._integrity_error = str(e) or "check_integrity() failed"
            logger.error("KV cache integrity check failed: %s", self._integrity_error)

    def _send_stats(self, nonce: int) -> None:
        if not self.engine.has_unfinished_requests():
            self._check_integrity_once()
        kv = self.engine.kv_manager
        hits = self.engine.scheduler.prefix_stats
        self._outbox.send(encode(EngineStats(
            nonce, kv.num_free_slots, kv.num_slots, self.engine.num_unfinished_requests,
            self._integrity_error is None, self._integrity_error, kv.num_cached_slots,
            hits.num_queried_tokens, hits.num_hit_tokens)))
