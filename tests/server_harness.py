"""Starting, watching and stopping a real `kestrel serve` in tests, and reading its processes.

`start_server` runs `python -m kestrel.cli serve ...` with its log in a file and waits for
/health to answer 200; `tiny_model` saves a small random Llama that uses the bundled SmolLM2
tokenizer (fast to load and to step, real text in and out). The process helpers read /proc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import make_tiny_hf_model

START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 30


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str
    saw_503: bool

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: str, max_len: int = 2048) -> tuple[str, list[str]]:
    """(model folder, the serve arguments that give it the SmolLM2 tokenizer and the name "tiny")."""
    from kestrel.config import EngineConfig
    from kestrel.server.commands import tokenizer_path

    model_dir = os.path.join(folder, "tiny")
    if not os.path.exists(model_dir):
        make_tiny_hf_model(model_dir, "llama", vocab_size=49152, max_position_embeddings=max_len)
    return model_dir, ["--tokenizer", tokenizer_path(EngineConfig()), "--served-model-name", "tiny"]


def start_server(tmp_dir: str, *args: str, env: dict | None = None) -> Server:
    port = free_port()
    log_path = os.path.join(tmp_dir, f"server-{port}.log")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **(env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, saw_503=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kestrel serve exited with {proc.returncode}:\n{server.log()[-5000:]}")
        try:
            status = httpx.get(server.url + "/health", timeout=5).status_code
        except httpx.HTTPError:
            status = None
        server.saw_503 |= status == 503
        if status == 200:
            return server
        time.sleep(0.5)
    stop(server.proc)
    pytest.fail(f"kestrel serve did not become healthy:\n{server.log()[-5000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_all_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


def engine_pid(server_pid: int) -> int:
    """The server's engine process: the one child that maps torch's shared library."""
    for pid in descendants(server_pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "libtorch" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no engine process under {server_pid}")


def wait_for(condition, timeout: float = 60.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def sigterm_and_check_no_orphans(srv: Server) -> None:
    children = descendants(srv.proc.pid)
    assert len(children) >= 2
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(STOP_TIMEOUT_S) == 0
    assert wait_all_gone(children) == set(), srv.log()[-3000:]
    assert "all server processes stopped" in srv.log()


def engine_state(url: str, headers: dict | None = None) -> dict:
    return httpx.get(url + "/debug/state", timeout=30, headers=headers).json()


def wait_engine_idle(url: str, timeout: float = 60.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(url, headers)
        e = state["engine"]
        is_idle = e["num_free_slots"] + e["num_cached_slots"] == e["num_slots"] and e["num_unfinished_requests"] == 0
        if is_idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def stream_tokens(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, list[dict]]:
    """POST a streaming completion; (status, the JSON events before [DONE])."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=timeout,
                      headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return 200, events
