"""Load and observability against one real `kestrel serve` (a tiny random model, SmolLM2's tokenizer).

64 concurrent streams all complete with the right token count; 200 clients that drop mid-stream
leave every KV slot free; /metrics shows the `kestrel:` metrics of both processes; /v1/stats has
one worker; /dashboard loads in headless Chromium and draws and updates while a load runs; the
engine logs its periodic line and no prompt text reaches the log (no --log-requests).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import httpx
import pytest

from tests.server_harness import start_server, stop, stream_tokens, tiny_model, wait_engine_idle

_SECRET_PROMPT = "zebra-quartz-marker says hello"
_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("observe"))
    model_dir, args = tiny_model(folder)
    srv = start_server(folder, model_dir, *args, "--kv-cache-memory-gb", "0.1", "--max-model-len", "256",
                       "--max-num-seqs", "64", "--log-stats-interval", "1", "--disable-uvicorn-access-log")
    yield srv
    stop(srv.proc)


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int, drop_after: int | None = None) -> int:
    """Tokens one streaming completion reported (usage), or -1 once it dropped after `drop_after` events."""
    body = {"prompt": _SECRET_PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen, tokens = 0, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            seen += 1
            if drop_after is not None and seen >= drop_after:
                return -1  # leaving the block closes the connection mid-stream
            event = json.loads(line[6:])
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        return tokens


async def _many(url: str, num: int, max_tokens: int, drop_after: int | None = None) -> list[int]:
    limits = httpx.Limits(max_connections=num, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return await asyncio.gather(*[_stream(client, url, max_tokens, drop_after) for _ in range(num)])


def test_64_concurrent_streams_complete_with_their_token_counts(server):
    assert asyncio.run(_many(server.url, 64, 24)) == [24] * 64
    stats = httpx.get(server.url + "/v1/stats").json()
    assert stats["status"] == "ok" and stats["num_first_tokens"] >= 64
    assert stats["ttft_p50_s"] <= stats["ttft_p99_s"]


def test_disconnect_storm_leaves_kv_free(server):
    assert asyncio.run(_many(server.url, 200, 200, drop_after=2)) == [-1] * 200
    state = wait_engine_idle(server.url)
    e = state["engine"]
    assert e["num_free_slots"] + e["num_cached_slots"] == e["num_slots"] and e["num_unfinished_requests"] == 0
    assert e["integrity_ok"], e["integrity_error"]
    assert state["api"]["num_in_flight_requests"] == 0
    status, events = stream_tokens(server.url, {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True,
                                                "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1]["usage"]["completion_tokens"] == 4


def _samples(text: str) -> dict[str, float]:
    """`name{labels} value` lines of the Prometheus text, summed over label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def test_metrics_of_both_processes(server):
    text = httpx.get(server.url + "/metrics").text
    values = _samples(text)
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "request_success_total"):
        assert f"kestrel:{name}" in values, name
    assert values["kestrel:generation_tokens_total"] >= 64 * 24
    assert values["kestrel:time_to_first_token_seconds_count"] >= 64 + 200
    assert 'kestrel:request_success_total{finished_reason="length",model_name="tiny"}' in text
    assert 'finished_reason="abort"' in text
    assert all('model_name="tiny"' in line for line in text.splitlines() if line.startswith("kestrel:"))


def test_stats_has_one_worker(server):
    stats = httpx.get(server.url + "/v1/stats").json()
    assert stats["model_name"] == "tiny" and stats["heartbeat_age_s"] < 5
    (worker,) = stats["workers"]
    assert worker["rank"] == 0 and 0 <= worker["kv_cache_usage"] <= 1 and worker["interval_s"] > 0
    assert {"tokens_per_s", "mean_step_time_ms", "mean_batch_size", "prefix_cache_hit_rate"} <= set(worker)


class _Load(threading.Thread):
    """Streams in the background (8 at a time) until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop_event = url, threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            asyncio.run(_many(self.url, 8, 48))


@pytest.mark.skipif(_CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_dashboard_draws_and_updates_in_chromium_while_a_load_runs(server):
    load = _Load(server.url)
    load.start()
    try:
        with _Chromium(server.url + "/dashboard") as page:
            page.wait_for("window.kestrelDashboard && window.kestrelDashboard.samples >= 3", 30)
            first = page.evaluate("window.kestrelDashboard.samples")
            page.wait_for(f"window.kestrelDashboard.samples >= {first + 3}", 30)
            page.wait_for("window.kestrelDashboard.peakGenerationTokensPerS > 0", 30)
            state = page.evaluate("JSON.stringify(window.kestrelDashboard)")
            drawn = page.evaluate(_COUNT_DRAWN_PIXELS)
            if os.environ.get("KESTREL_DASHBOARD_SCREENSHOT"):
                page.screenshot(os.environ["KESTREL_DASHBOARD_SCREENSHOT"])
    finally:
        load.stop_event.set()
        load.join(120)
    state = json.loads(state)
    assert state["lastError"] is None and state["draws"] >= state["samples"] - 1
    assert state["peakRunning"] >= 1
    assert drawn > 100, "the throughput chart drew no line"
    assert httpx.get(server.url + "/dashboard").text.count("http") == 0  # nothing fetched from elsewhere


_COUNT_DRAWN_PIXELS = """(() => {
  const c = document.getElementById("chart-throughput");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 150 && d[i] < 60) n++;  // the blue line
  return n;
})()"""


class _Chromium:
    """Headless Chromium on one page, driven over the DevTools protocol (Runtime.evaluate)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._dir = tempfile.mkdtemp(prefix="kestrel-chromium-")
        self._ids = iter(range(1, 10**6))

    def __enter__(self) -> _Chromium:
        from websockets.sync.client import connect

        self._proc = subprocess.Popen(
            [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self._dir}", "--remote-debugging-port=0", "--window-size=1200,800", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self._dir, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            assert time.monotonic() < deadline and self._proc.poll() is None, "Chromium did not start"
            time.sleep(0.2)
        port = int(open(port_file).read().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self._connection = connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26)
        self._ws = self._connection.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(None, None, None)
        self._proc.kill()
        self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == call_id:
                return reply["result"]

    def evaluate(self, expression: str):
        return self._call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!!({expression})"):
            assert time.monotonic() < deadline, f"not true in {timeout} s: {expression}"
            time.sleep(0.25)

    def screenshot(self, path: str) -> None:
        import base64

        with open(path, "wb") as f:
            f.write(base64.b64decode(self._call("Page.captureScreenshot", format="png")["data"]))


def test_periodic_log_line_and_no_prompt_text(server):
    log = server.log()
    assert "generation" in log and "tokens/s" in log and "running" in log and "KV cache" in log
    assert _SECRET_PROMPT not in log and "zebra" not in log
