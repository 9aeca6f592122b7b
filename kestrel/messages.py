"""Every message that crosses a process boundary in the server, and the one serializer.

The server is three processes joined by ZMQ PUSH/PULL sockets (see `kestrel/server/`):

    API server --AddRequest, AbortRequests, GetEngineStats--> engine
    engine --TokenBatch, EngineReady, EngineStats, EngineHeartbeat--> detokenizer
    detokenizer --AbortRequests (a stop string matched)--> engine
    detokenizer --TextBatch, RequestFailed, EngineReady, EngineStats, EngineHeartbeat--> API server
    supervisor --ProcessDied, Drain--> API server

Messages are frozen, tagged msgspec Structs; `encode`/`decode` (msgpack) are the only way to put
them on or take them off a socket, and `decode` validates types (a `SamplingParams` is rebuilt
and re-validated on the way in). No torch here (dependency layer 1).
"""

from __future__ import annotations

from typing import Union

import msgspec

from kestrel.outputs import EngineOutput
from kestrel.sampling_params import SamplingParams


class _Message(msgspec.Struct, frozen=True, tag=True):
    """Base of all messages: frozen, tagged with the class name for union decoding."""


# ---- API server -> engine ------------------------------------------------------------
class AddRequest(_Message):
    """Queue one engine request (one of the n completions of a prompt)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """Validated by the API server; `n` is already expanded (each engine request has n=1)."""


class AbortRequests(_Message):
    """Stop these requests and free their KV slots; unknown or finished ids are ignored."""

    request_ids: list[str]


class GetEngineStats(_Message):
    """Ask the engine for an `EngineStats` reply carrying the same nonce."""

    nonce: int


# ---- engine -> detokenizer (-> API server) ---------------------------------------------
class RequestFailed(_Message):
    """The engine could not take or run a request; it is finished and holds no slots."""

    request_id: str
    message: str
    """What went wrong, phrased for the user."""
    is_user_error: bool = True
    """True: the request was bad (HTTP 400); False: the engine failed (HTTP 500)."""
    param: str | None = None
    """The request field that was bad, when known (e.g. a schema that does not compile)."""


class TokenBatch(_Message):
    """Everything one engine iteration has to say, in the order the detokenizer applies it."""

    started: list[AddRequest]
    """Requests accepted since the last batch (their prompt and stop strings, for detokenizing)."""
    failed: list[RequestFailed]
    aborted: list[str]
    """Ids aborted since the last batch (client gone or stop string): drop their state."""
    outputs: list[EngineOutput]
    """One entry per request that made progress in this step."""


class EngineReady(_Message):
    """The model is loaded and the engine loop runs; what the API server validates against."""

    model_path: str
    max_model_len: int
    vocab_size: int
    num_slots: int
    """KV slots (tokens) in the pool."""
    eos_token_ids: list[int]
    max_num_seqs: int = 0
    """Most requests running at once (the API's queue limit counts requests beyond it)."""


class EngineStats(_Message):
    """Reply to `GetEngineStats`: KV occupancy, prefix-cache hits and the last integrity check."""

    nonce: int
    num_free_slots: int
    num_slots: int
    num_unfinished_requests: int
    integrity_ok: bool
    """The last `check_integrity()` (run whenever the engine goes idle) passed."""
    integrity_error: str | None = None
    num_cached_slots: int = 0
    """Slots the prefix cache holds (locked by running requests or not)."""
    num_prefix_queried_tokens: int = 0
    """Tokens of every admitted request, looked up in the prefix cache."""
    num_prefix_hit_tokens: int = 0
    """Of those, tokens whose KV came from the cache."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.num_prefix_queried_tokens
        return self.num_prefix_hit_tokens / q if q else 0.0


class WorkerStats(_Message, tag=False):
    """What one worker (one device; each tensor-parallel rank later) did over the last interval."""

    rank: int
    interval_s: float
    num_steps: int
    num_prompt_tokens: int
    """Prompt tokens computed (prefill, recompute after preemption; prefix-cache hits excluded)."""
    num_generation_tokens: int
    mean_step_time_s: float
    max_step_time_s: float
    mean_batch_size: float
    """Requests per step."""
    kv_cache_usage: float
    """Fraction of the KV slots in use, at the end of the interval."""
    num_prefix_queried_tokens: int
    num_prefix_hit_tokens: int


class EngineHeartbeat(_Message):
    """Sent about once a second by the engine loop: its queue, its progress, its workers' figures.

    The API process serves /v1/stats from the latest one and calls the engine stalled when none
    arrives (or no step finishes) for `--stall-timeout` seconds while work is pending.
    """

    num_running: int
    num_waiting: int
    seconds_since_progress: float
    """Time since the last step finished while requests were pending; 0 when idle."""
    workers: list[WorkerStats]


# ---- detokenizer -> API server ---------------------------------------------------------
class TopLogprob(_Message, tag=False):
    """One candidate token at one generated position."""

    token_id: int
    token: str
    """The token decoded on its own (may be U+FFFD for a partial UTF-8 character)."""
    logprob: float
    rank: int = 0
    """1 = most likely under the raw model distribution."""


class PositionLogprobs(_Message, tag=False):
    """Log-probabilities at one generated position: the chosen token and the top alternatives."""

    chosen: TopLogprob
    top: list[TopLogprob]
    """The most likely tokens, best first (as many as the request asked for)."""


class TextDelta(_Message, tag=False):
    """What one engine request added since the last delta, as text the client may see now."""

    request_id: str
    text: str
    """New visible text: never part of a possible stop string, never half a character."""
    token_ids: list[int]
    """New generated token ids (also those whose text is held back)."""
    logprobs: list[PositionLogprobs] | None
    """One entry per new token id, when the request asked for logprobs."""
    finish_reason: str | None = None
    """None while running; "stop" or "length" when this is the request's last delta."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request (None for EOS and length)."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (the same in every delta of a request)."""


class TextBatch(_Message):
    deltas: list[TextDelta]


# ---- supervisor -> API server ----------------------------------------------------------
class ProcessDied(_Message):
    """A child process of `kestrel serve` exited; its in-flight requests fail."""

    name: str
    pid: int
    exitcode: int | None
    is_restarting: bool = False
    """The supervisor starts a new engine and detokenizer (`--restart-engine`); the next
    `EngineReady` means the server can generate again."""


class Drain(_Message):
    """Stop accepting requests, let those in flight finish within `timeout_s`, then exit."""

    timeout_s: float


Message = Union[AddRequest, AbortRequests, GetEngineStats, RequestFailed, TokenBatch, EngineReady,
                EngineStats, EngineHeartbeat, TextBatch, ProcessDied, Drain]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """Serialize a message for a socket."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Deserialize and type-check a message; raises `msgspec.ValidationError` on a bad one."""
    return _decoder.decode(data)
