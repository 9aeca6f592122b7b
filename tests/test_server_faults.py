"""Faults against a real `kestrel serve` (a tiny random model, SmolLM2's tokenizer): what clients see.

- The engine dies, no --restart-engine: /health 503 within 1 s, waiting clients get errors, the
  server exits with status 1 and leaves no process behind (with the API key from the environment).
- --restart-engine: a stalled engine (SIGSTOP) turns /health to 503 until it moves again; a killed
  engine fails the requests in flight and a later request succeeds; SIGTERM with requests in flight
  drains: they complete, a new request gets 503 + Retry-After, the exit status is 0, the log clean.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server_harness import (STOP_TIMEOUT_S, descendants, engine_pid, start_server, stop, stream_tokens,
                                  tiny_model, wait_all_gone, wait_for)

_BODY = {"model": "tiny", "prompt": "Hello there", "ignore_eos": True, "stream_options": {"include_usage": True}}


class _Stream(threading.Thread):
    """A streaming completion in the background; `first` is set once a first event arrived."""

    def __init__(self, url: str, max_tokens: int, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.headers = url, max_tokens, headers
        self.first = threading.Event()
        self.status: int | None = None
        self.events: list[dict] = []

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=dict(_BODY, max_tokens=self.max_tokens,
                                                                          stream=True),
                          headers=self.headers, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.events.append(httpx.Response(200, content=line[6:]).json())
                    self.first.set()
        self.first.set()

    @property
    def completion_tokens(self) -> int | None:
        usage = [e["usage"] for e in self.events if e.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None

    @property
    def error(self) -> str | None:
        return next((e["error"]["message"] for e in self.events if "error" in e), None)


def _seconds_until_503(url: str, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if httpx.get(url + "/health", timeout=5).status_code == 503:
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")


def test_engine_death_fails_requests_and_exits_1(tmp_path):
    model_dir, args = tiny_model(str(tmp_path))
    srv = start_server(str(tmp_path), model_dir, *args, "--kv-cache-memory-gb", "0.05", "--max-model-len", "1024",
                       env={"KESTREL_API_KEY": "sekret"})
    auth = {"Authorization": "Bearer sekret"}
    try:
        assert "sekret" not in open(f"/proc/{srv.proc.pid}/cmdline").read()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/stats").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200 == httpx.get(srv.url + "/metrics").status_code
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        tiny = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0, timeout=120)
        assert tiny.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
        stream = _Stream(srv.url, 900, auth)
        stream.start()
        assert stream.first.wait(60)
        waiting: dict = {}
        blocking = threading.Thread(target=lambda: waiting.update(r=httpx.post(
            srv.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 900, "ignore_eos": True},
            headers=auth, timeout=120)))
        blocking.start()
        time.sleep(0.3)
        children = descendants(srv.proc.pid)
        os.kill(engine_pid(srv.proc.pid), signal.SIGKILL)
        assert _seconds_until_503(srv.url) < 1.0
        stream.join(30)
        blocking.join(30)
        assert "engine process died" in (stream.error or "")
        assert waiting["r"].status_code == 503 and "engine process died" in waiting["r"].json()["error"]["message"]
        assert srv.proc.wait(STOP_TIMEOUT_S) == 1
        assert wait_all_gone(children) == set()
        assert "start it with --restart-engine" in srv.log()
    finally:
        stop(srv.proc)


def test_stall_restart_and_drain(tmp_path):
    model_dir, args = tiny_model(str(tmp_path))
    srv = start_server(str(tmp_path), model_dir, *args, "--kv-cache-memory-gb", "0.05", "--max-model-len", "1024",
                       "--restart-engine", "--stall-timeout", "2", "--log-requests", "--disable-uvicorn-access-log")
    try:
        _stalled_engine_turns_health_503(srv.url, engine_pid(srv.proc.pid))
        _killed_engine_restarts(srv)
        assert "Hello there" in srv.log()  # --log-requests shows prompts
        _sigterm_drains_requests_in_flight(srv)
    finally:
        stop(srv.proc)


def _stalled_engine_turns_health_503(url: str, pid: int) -> None:
    stream = _Stream(url, 40)
    stream.start()
    assert stream.first.wait(60)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["status"] == "stalled", timeout=15)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, timeout=15)
    stream.join(60)
    assert stream.completion_tokens == 40 and stream.error is None


def _killed_engine_restarts(srv) -> None:
    stream = _Stream(srv.url, 900)
    stream.start()
    assert stream.first.wait(60)
    os.kill(engine_pid(srv.proc.pid), signal.SIGKILL)
    assert _seconds_until_503(srv.url) < 1.0
    assert httpx.get(srv.url + "/health").json()["status"] == "restarting"
    stream.join(30)
    assert "engine process died" in (stream.error or "")
    wait_for(lambda: httpx.get(srv.url + "/health", timeout=5).status_code == 200, timeout=300, interval=0.5)
    status, events = stream_tokens(srv.url, dict(_BODY, max_tokens=5))
    assert status == 200 and events[-1]["usage"]["completion_tokens"] == 5
    assert srv.proc.poll() is None and "restart 1" in srv.log()


def _sigterm_drains_requests_in_flight(srv) -> None:
    children = descendants(srv.proc.pid)
    streams = [_Stream(srv.url, 150) for _ in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(srv.url + "/health", timeout=5).json()["status"] == "draining", timeout=10,
             interval=0.05)
    refused = httpx.post(srv.url + "/v1/completions", json=dict(_BODY, max_tokens=5), timeout=30)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    for s in streams:
        s.join(120)
        assert s.status == 200 and s.error is None and s.completion_tokens == 150
    assert srv.proc.wait(STOP_TIMEOUT_S) == 0
    assert wait_all_gone(children) == set()
    log = srv.log()
    assert "Traceback" not in log and "all server processes stopped" in log
