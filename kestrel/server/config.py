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

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
