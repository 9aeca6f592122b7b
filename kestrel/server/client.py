"""The API process's side of the pipeline: submit requests, route text deltas back to their callers.

`EngineClient` owns the API process's two sockets (PUSH to the engine, PULL from the detokenizer and
the supervisor) and one background task that reads the PULL socket. A caller submits a group of
engine requests (the n completions of one or more prompts) with `generate()` and iterates the
returned `RequestGroup`; closing the group early (client gone, error) aborts whatever is still
running, so its KV slots are freed.

Contract: every delta of a request reaches its group's queue in order; a request's last delta has
a finish_reason; a failed request, a dead engine or the group's deadline (`--request-timeout`)
raises `EngineError` in the iterating caller. The reader also keeps the engine's latest
`EngineHeartbeat` (for /v1/stats and the stall check) and hands a supervisor's `Drain` to
`on_drain`. No torch here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from kestrel.messages import (AbortRequests, AddRequest, Drain, EngineHeartbeat, EngineReady, EngineStats,
                              GetEngineStats, Message, ProcessDied, RequestFailed, TextBatch, TextDelta, decode,
                              encode)
from kestrel.sampling_params import SamplingParams
from kestrel.server.config import IpcAddresses

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """A request could not be completed; `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 500, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One engine request of a group: which output slot it fills and what to run."""

    index: int
    """Position of this completion among the group's choices."""
    prompt_token_ids: list[int]
    params: SamplingParams


class GroupObserver(Protocol):
    """Sees every delta of a group and its end (the API process's request metrics)."""

    def on_delta(self, request_id: str, delta: TextDelta) -> None: ...

    def on_close(self, unfinished: set[str]) -> None: ...


class RequestGroup:
    """The engine requests behind one API call; async-iterate it for (index, TextDelta) pairs."""

    def __init__(self, client: EngineClient, request_ids: dict[str, int], deadline: float | None = None,
                 observer: GroupObserver | None = None) -> None:
        self._client = client
        self._index_of = request_ids
        """Engine request id -> choice index."""
        self._unfinished = set(request_ids)
        self._deadline = deadline
        """time.monotonic() after which iterating raises a timeout EngineError (None: never)."""
        self._observer = observer
        self.queue: asyncio.Queue[TextDelta | EngineError] = asyncio.Queue()
        self._held: list[TextDelta | EngineError] = []
        """Items taken by `wait_first`, handed out again first."""

    @property
    def is_finished(self) -> bool:
        return not self._unfinished

    async def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta]]:
        try:
            while self._unfinished:
                item = self._held.pop() if self._held else await self._next()
                if isinstance(item, EngineError):
                    raise item
                if item.finish_reason is not None:
                    self._unfinished.discard(item.request_id)
                if self._observer is not None:
                    self._observer.on_delta(item.request_id, item)
                yield self._index_of[item.request_id], item
        finally:
            self.close()

    async def wait_first(self) -> None:
        """Wait until the engine has accepted the group (its first delta); EngineError if it refused it."""
        item = await self._next()
        self._held.append(item)
        if isinstance(item, EngineError):
            raise item

    async def _next(self) -> TextDelta | EngineError:
        if self._deadline is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(self._deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            return EngineError("the request did not finish within the server's --request-timeout", 408)

    def close(self) -> None:
        """Abort the requests still running (idempotent); called when iteration ends for any reason."""
        if self._observer is not None:
            self._observer.on_close(self._unfinished)
            self._observer = None
        self._client._release(self._index_of, self._unfinished)
        self._unfinished = set()


class EngineClient:
    """Talks to the engine and detokenizer processes over ZMQ from the API process's event loop."""

    def __init__(self, addrs: IpcAddresses) -> None:
        self._addrs = addrs
        self._ctx = zmq.asyncio.Context()
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._inbox = self._ctx.socket(zmq.PULL)
        self._groups: dict[str, RequestGroup] = {}
        self._stats_waiters: dict[int, asyncio.Future[EngineStats]] = {}
        self._nonces = itertools.count()
        self._reader: asyncio.Task | None = None
        self.engine_info: EngineReady | None = None
        """Set when the engine announced itself (model loaded)."""
        self.dead_reason: str | None = None
        """Set when a server process died; cleared when a restarted engine is ready."""
        self.is_restarting = False
        self.heartbeat: EngineHeartbeat | None = None
        self.heartbeat_at = 0.0
        """time.monotonic() when `heartbeat` arrived."""
        self.on_drain: Callable[[float], None] | None = None

    async def start(self) -> None:
        self._inbox.bind(self._addrs.api_inbox)
        self._to_engine.connect(self._addrs.engine_inbox)
        self._reader = asyncio.create_task(self._read_loop(), name="engine-client-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._ctx.destroy(linger=0)

    @property
    def num_in_flight(self) -> int:
        """Engine requests this process still waits on."""
        return len(self._groups)

    # ---- requests ------------------------------------------------------------
    def seconds_without_progress(self) -> float:
        """How long the engine has had work without finishing a step, as far as its heartbeats tell."""
        hb = self.heartbeat
        if hb is None or not (hb.num_running or hb.num_waiting or self._groups):
            return 0.0
        return hb.seconds_since_progress + time.monotonic() - self.heartbeat_at

    async def generate(self, base_id: str, requests: list[EngineRequest], deadline: float | None = None,
                       observer: GroupObserver | None = None) -> RequestGroup:
        """Submit the requests (ids base_id-<index>; `base_id` must be unique) and return the group to iterate."""
        self._check_alive()
        ids = {f"{base_id}-{r.index}": r.index for r in requests}
        if not self._groups.keys().isdisjoint(ids):
            raise EngineError(f"request id {base_id!r} is already in flight", 500)
        group = RequestGroup(self, ids, deadline, observer)
        for request_id, request in zip(ids, requests):
            self._groups[request_id] = group
            await self._to_engine.send(encode(AddRequest(request_id, request.prompt_token_ids, request.params)))
        return group

    async def get_stats(self, timeout: float = 10.0) -> EngineStats:
        """Ask the engine for KV occupancy and its last integrity check."""
        self._check_alive()
        nonce = next(self._nonces)
        future: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._stats_waiters[nonce] = future
        try:
            await self._to_engine.send(encode(GetEngineStats(nonce)))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._stats_waiters.pop(nonce, None)

    def _release(self, ids: dict[str, int], unfinished: set[str]) -> None:
        for request_id in ids:
            self._groups.pop(request_id, None)
        if unfinished and self.dead_reason is None:
            # zmq.asyncio's send queues the message at once and returns an already finished future.
            self._to_engine.send(encode(AbortRequests(sorted(unfinished))))

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineError(self.dead_reason, 503)
        if self.engine_info is None:
            raise EngineError("the model is still loading; retry when GET /health answers 200", 503)

    # ---- the reader task -----------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            data = await self._inbox.recv()
            try:
                self._dispatch(decode(data))
            except msgspec.MsgspecError as e:
                logger.error("dropped a malformed message: %s", e)
            except Exception:
                logger.exception("error while dispatching a message")

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, TextBatch):
            for delta in message.deltas:
                group = self._groups.get(delta.request_id)
                if group is not None:
                    if delta.finish_reason is not None:
                        del self._groups[delta.request_id]
                    group.queue.put_nowait(delta)
        elif isinstance(message, RequestFailed):
            group = self._groups.pop(message.request_id, None)
            if group is not None:
                group.queue.put_nowait(EngineError(message.message, 400 if message.is_user_error else 500,
                                                   message.param))
        elif isinstance(message, EngineStats):
            future = self._stats_waiters.get(message.nonce)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, EngineHeartbeat):
            self.heartbeat, self.heartbeat_at = message, time.monotonic()
        elif isinstance(message, EngineReady):
            self.engine_info, self.heartbeat = message, None
            self.dead_reason, self.is_restarting = None, False
            logger.info("engine is ready (max_model_len %d)", message.max_model_len)
        elif isinstance(message, ProcessDied):
            self._on_process_died(message)
        elif isinstance(message, Drain) and self.on_drain is not None:
            self.on_drain(message.timeout_s)

    def _on_process_died(self, message: ProcessDied) -> None:
        then = ("a new engine is starting; retry when GET /health answers 200" if message.is_restarting
                else "the server is stopping")
        self.dead_reason = f"the {message.name} process died (exit code {message.exitcode}); {then}"
        self.is_restarting = message.is_restarting
        logger.error("%s", self.dead_reason)
        self.fail_all(EngineError(self.dead_reason, 503))

    def fail_all(self, error: EngineError) -> None:
        """End every request in flight with `error` (they are not aborted: the engine is gone or going)."""
        for group in set(self._groups.values()):
            group.queue.put_nowait(error)
        self._groups.clear()
        for future in self._stats_waiters.values():
            if not future.done():
                future.set_exception(error)
