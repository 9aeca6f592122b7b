"""What the server processes are told at start-up: addresses and API settings (frozen, picklable).

`ServerConfig` is built once by `kestrel serve` and handed to the API process; `IpcAddresses`
names the one inbox (a ZMQ PULL socket, bound by its owner) of each process. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IpcAddresses:
    """ZMQ endpoints: each process binds its own inbox and connects PUSH sockets to the others'."""

    api_inbox: str
    """Text deltas, engine replies and supervisor notices for the API process."""
    engine_inbox: str
    """Requests and aborts for the engine process."""
    detokenizer_inbox: str
    """Token batches for the detokenizer process."""

    @classmethod
    def in_dir(cls, folder: str) -> IpcAddresses:
        """ipc:// sockets in a private temporary folder."""
        return cls(api_inbox=f"ipc://{os.path.join(folder, 'api')}",
                   engine_inbox=f"ipc://{os.path.join(folder, 'engine')}",
                   detokenizer_inbox=f"ipc://{os.path.join(folder, 'detokenizer')}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the API process (flag names follow `vllm serve`)."""

    host: str
    port: int
    served_model_names: tuple[str, ...]
    """Names a request's `model` may use; the first is the one /v1/models and responses report."""
    tokenizer_path: str
    """HF folder or GGUF file the API process loads its tokenizer and chat template from."""
    api_key: str | None = None
    """When set, /v1 and /generate need `Authorization: Bearer <api_key>`."""
    log_level: str = "info"
    access_log: bool = True
    """Log one line per HTTP request (uvicorn's access log)."""
    tool_call_parser: str = "auto"
    """Format of tool calls in the output (hermes, llama3_json, mistral); auto: read from the chat template."""
    truncate_chat_history: bool = False
    """A chat longer than the context loses its oldest turns after the system message (else: a 400);
    a request's `truncate_chat_history` overrides it."""
    log_requests: bool = False
    """Log each request's prompt and parameters; without it, no prompt text reaches the log."""
    log_stats_interval_s: float = 10.0
    """The engine logs one line of throughput, queue and KV use this often while busy; 0: never."""
    stall_timeout_s: float = 120.0
    """/health answers 503 when the engine has work but made no step for this long; 0: never."""
    restart_engine: bool = False
    """A dead engine or detokenizer is restarted (its in-flight requests fail) instead of the
    server exiting with status 1."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish before they are failed."""
    max_queued_requests: int | None = None
    """Engine requests admitted beyond what runs at once (max_num_seqs); beyond it: 503 + Retry-After."""
    request_timeout_s: float | None = None
    """A request not finished after this long ends with an error (408) and frees its KV."""
    max_request_body_mb: float = 16.0
    """Larger request bodies get 413 without being read."""
    allowed_origins: tuple[str, ...] = ()
    """Origins allowed by CORS; empty: no CORS headers at all."""

    def __post_init__(self) -> None:
        for name in ("log_stats_interval_s", "stall_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name.removesuffix('_s').replace('_', '-')} must be >= 0, got {value}.")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max-queued-requests must be >= 0, got {self.max_queued_requests}.")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request-timeout must be > 0, got {self.request_timeout_s}.")
        if self.max_request_body_mb <= 0:
            raise ValueError(f"max-request-body-mb must be > 0, got {self.max_request_body_mb}.")

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
