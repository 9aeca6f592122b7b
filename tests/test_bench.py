"""`kestrel bench offline` on a tiny random model and `kestrel bench serve` against a fake server.

The fake server is a plain asyncio HTTP server in a thread that streams SSE
chunks with known delays (first chunk after TTFT_S, then one every ITL_S) and
answers 500 to prompts containing "FAIL", so the measured TTFT / ITL / TPOT and
the failure count can be checked against what it did.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

from kestrel.bench import serve
from kestrel.cli import main

TTFT_S = 0.2
ITL_S = 0.05


# ---- offline -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["kestrel", "hf"])
def test_bench_offline_counts_and_saves(tiny_llama_dir, tmp_path, capsys, backend):
    out = tmp_path / "offline.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "offline", tiny_llama_dir, "--backend", backend, "--load-format", "dummy",
                   "--num-prompts", "5", "--input-len", "12", "--output-len", "6", "--max-num-seqs", "2",
                   "--num-warmup-tokens", "2", "--num-iters", "2", "--output-json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Offline Benchmark Result" in printed and "Output tokens/s:" in printed
    r = json.loads(out.read_text())
    assert r["backend"] == backend
    assert r["num_output_tokens"] == 5 * 6
    assert r["elapsed_s"] > 0 and r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    assert len(r["all_elapsed_s"]) == 2 and r["elapsed_s"] == min(r["all_elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx(r["output_tokens_per_s"] * (12 + 6) / 6)
    assert r["ms_per_output_token"] == pytest.approx(r["elapsed_s"] * 1e3 / 30)
    assert 0 < r["mean_decode_step_ms"] < r["elapsed_s"] * 1e3
    assert r["per_sequence_tokens_per_s"] == pytest.approx(1e3 / r["mean_decode_step_ms"])
    assert 0 < r["mean_ttft_ms"] <= r["elapsed_s"] * 1e3


def test_bench_latency_times_startup_prefill_and_decode(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(["bench", "latency", tiny_llama_dir, "--load-format", "dummy", "--batch-size", "3",
               "--input-len", "10", "--output-len", "5", "--num-iters", "2", "--output-json", str(out)])
    assert rc == 0
    assert "Latency Benchmark Result" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["batch_size"] == 3 and r["input_len"] == 10 and r["output_len"] == 5
    assert 0 < r["engine_init_s"] < r["startup_to_first_token_s"]
    assert len(r["all_e2e_latency_s"]) == 2 and r["e2e_latency_s"] == min(r["all_e2e_latency_s"])
    assert 0 < r["prefill_ms"] < r["e2e_latency_s"] * 1e3
    # 4 pure decode steps after the prefill step gives each request its first token
    assert 0 < r["decode_step_ms_median"] and r["decode_step_ms_mean"] * 4 < r["e2e_latency_s"] * 1e3


def _offline(tiny_llama_dir, tmp_path, *args: str) -> dict:
    out = tmp_path / "offline.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "offline", tiny_llama_dir, "--load-format", "dummy", "--num-warmup-tokens", "2",
                   "--num-kv-slots", "4096", "--temperature", "0", "--output-json", str(out), *args])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("cache", [True, False])
def test_bench_offline_shared_prefix(tiny_llama_dir, tmp_path, capsys, cache):
    r = _offline(tiny_llama_dir, tmp_path, "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group",
                 "3", "--prefix-len", "40", "--input-len", "5", "--output-len", "4", "--max-num-seqs", "4",
                 *([] if cache else ["--disable-radix-cache"]))
    assert r["dataset"] == "shared-prefix" and r["workload"]["prefix_len"] == 40
    assert (r["num_prompts"], r["input_len"], r["num_output_tokens"]) == (6, 45, 24)
    assert r["prefix_caching"] is cache
    # per group: the first request computes the prefix, the other two find it (the run starts cold)
    assert r["prefix_cache_hit_rate"] == (pytest.approx(2 * 2 * 40 / (6 * 45)) if cache else 0)
    assert "Prefix cache:" in capsys.readouterr().out


def test_bench_offline_multi_turn(tiny_llama_dir, tmp_path, capsys):
    r = _offline(tiny_llama_dir, tmp_path, "--dataset", "multi-turn", "--num-prompts", "2", "--num-turns", "3",
                 "--input-len", "10", "--output-len", "4", "--max-num-seqs", "2")
    assert r["num_output_tokens"] == 2 * 3 * 4 and len(r["mean_ttft_by_turn_ms"]) == 3
    # turn t's prompt is 10 + t * 14 tokens; all but the newest 10 (and the last answer token) are cached
    queried = 2 * sum(10 + t * 14 for t in range(3))
    assert r["prefix_cache_hit_rate"] == pytest.approx(2 * sum(t * 14 - 1 for t in range(1, 3)) / queried)
    assert "TTFT last turn / first turn:" in capsys.readouterr().out


def test_bench_offline_rejects_bad_sizes(tiny_llama_dir, capsys):
    rc = main(["bench", "offline", tiny_llama_dir, "--load-format", "dummy", "--num-prompts", "0"])
    assert rc == 2
    assert "num-prompts must be >= 1" in capsys.readouterr().err


# ---- the fake server -------------------------------------------------------------
class FakeOpenAIServer:
    """Streams `max_tokens` chunks "t0 ", "t1 ", ... with fixed delays; 500 for prompts with FAIL."""

    def __init__(self, send_usage: bool = True) -> None:
        self.send_usage = send_usage
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path = head.split(" ")[:2]
            length = next((int(ln.split(":")[1]) for ln in head.split("\r\n")
                           if ln.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if method == "GET" and path == "/v1/models":
                await self._reply(writer, 200, json.dumps({"data": [{"id": "fake-model"}]}))
            elif path in serve.ENDPOINTS:
                self.bodies.append(body)
                await self._stream(writer, path, body)
            else:
                await self._reply(writer, 404, "{}")
        finally:
            writer.close()

    async def _reply(self, writer, status: int, text: str) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(text)}\r\nConnection: close\r\n\r\n{text}".encode())
        await writer.drain()

    async def _stream(self, writer, path: str, body: dict) -> None:
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        if "FAIL" in prompt:
            await self._reply(writer, 500, json.dumps({"error": {"message": "boom"}}))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        chat = path.endswith("chat/completions")
        if chat:  # a role-only first chunk, as real servers send: must not count as a token
            self._event(writer, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(body["max_tokens"]):
            await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
            piece = f"t{i} "
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            self._event(writer, {"choices": [choice]})
            await writer.drain()
        if self.send_usage:
            self._event(writer, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"],
                                                          "prompt_tokens_details": {"cached_tokens": 3}}})
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    @staticmethod
    def _event(writer, obj: dict) -> None:
        writer.write(f"data: {json.dumps(obj)}\n\n".encode())


# ---- serve ---------------------------------------------------------------------
@pytest.mark.parametrize("endpoint,send_usage", [("/v1/completions", True), ("/v1/chat/completions", False)])
def test_bench_serve_measures_known_delays_and_failures(tmp_path, capsys, endpoint, send_usage):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nplease FAIL now\nwrite a poem\nsay hi\n")
    out = tmp_path / "serve.json"
    with FakeOpenAIServer(send_usage) as srv:
        rc = main(["bench", "serve", "--base-url", srv.base_url, "--endpoint", endpoint,
                   "--prompt-file", str(prompts), "--num-prompts", "8", "--random-output-len", "5",
                   "--max-concurrency", "4", "--top-p", "0.9", "--save-result", str(out)])
        bodies = srv.bodies
    assert rc == 0
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Mean TTFT (ms):" in printed and "P99 ITL (ms):" in printed
    r = json.loads(out.read_text())
    assert r["model"] == "fake-model"
    assert (r["completed"], r["failed"]) == (6, 2)
    assert r["total_output_tokens"] == 6 * 5
    assert r["total_input_tokens"] == (6 * 7 if send_usage else 0)
    assert r["total_cached_tokens"] == (6 * 3 if send_usage else 0)
    assert "HTTP 500" in next(e for e in r["errors"] if e)
    assert r["mean_ttft_ms"] == pytest.approx(TTFT_S * 1e3, rel=0.5)
    assert r["median_itl_ms"] == pytest.approx(ITL_S * 1e3, rel=0.5)
    assert r["median_tpot_ms"] == pytest.approx(ITL_S * 1e3, rel=0.5)
    expected_e2el = (TTFT_S + 4 * ITL_S) * 1e3
    assert r["median_e2el_ms"] == pytest.approx(expected_e2el, rel=0.5)
    assert all(b["stream"] and b["ignore_eos"] and b["max_tokens"] == 5 and b["top_p"] == 0.9 for b in bodies)
    assert all(b["stream_options"] == {"include_usage": True} for b in bodies)
    assert len(bodies) == 8 + 1  # plus the warm-up request


def test_bench_serve_poisson_rate_spreads_arrivals(tmp_path):
    with FakeOpenAIServer() as srv:
        spec = serve.ServeSpec(base_url=srv.base_url, request_rate=20.0, num_warmups=0, seed=1)
        prompts = [serve.BenchPrompt(f"p{i}", 3, 2) for i in range(10)]
        results, duration, model = asyncio.run(serve.run_serve(spec, prompts))
    starts = [r.start for r in results]
    assert model == "fake-model" and all(r.success for r in results)
    assert starts == sorted(starts) and starts[-1] > 0.1  # 9 gaps of mean 50 ms
    assert duration >= starts[-1] + TTFT_S + ITL_S


def test_bench_serve_unreachable_server_fails_cleanly(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
               "--prompt-file", str(prompts), "--num-prompts", "1", "--request-timeout", "5"])
    assert rc == 1
    assert "warm-up request" in capsys.readouterr().out


class CharTokenizer:  # one token per character; ids 0 and 1 are special
    all_special_ids = (0, 1)

    def __len__(self):
        return 30

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 2) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - ord("a") + 2 for c in text]


def test_random_prompts_have_the_requested_token_length():
    prompts = serve.random_prompts(CharTokenizer(), 3, 10, 4, seed=0)
    assert [p.prompt_len for p in prompts] == [10, 10, 10]
    assert all(len(p.text) == 10 and p.output_len == 4 for p in prompts)
    assert prompts == serve.random_prompts(CharTokenizer(), 3, 10, 4, seed=0)


def test_shared_prefix_prompts_share_a_system_prompt_per_group():
    from kestrel.bench.workloads import SharedPrefix

    w = SharedPrefix(num_groups=3, prompts_per_group=4, prefix_len=20, question_len=5)
    prompts = serve.shared_prefix_prompts(CharTokenizer(), w, 7, seed=0)
    assert len(prompts) == 12 and len({p.system for p in prompts}) == 3
    assert all(len(p.system) == 20 and len(p.text) == 5 and p.prompt_len == 25 and p.output_len == 7 for p in prompts)
    assert [p.system for p in prompts[:4]] != [prompts[0].system] * 4  # shuffled: the groups interleave
    chat = serve.request_body(serve.ServeSpec("http://x", endpoint="/v1/chat/completions"), "m", prompts[0])
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    completion = serve.request_body(serve.ServeSpec("http://x"), "m", prompts[0])
    assert completion["prompt"] == prompts[0].system + prompts[0].text


def test_wait_for_idle_cpu_returns_a_busy_fraction():
    from kestrel.bench.offline import wait_for_idle_cpu

    busy = wait_for_idle_cpu(max_busy=1.0, window_s=0.05)
    assert 0.0 <= busy <= 1.0


def test_bench_serve_json_schema_workload_sends_response_format():
    from kestrel.bench.serve import BenchPrompt, ServeSpec, request_body

    schema = {"type": "object"}
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        body = request_body(ServeSpec("http://x", endpoint, ignore_eos=False, json_schema=schema), "m",
                            BenchPrompt("hi", 1, 8))
        assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
        assert "ignore_eos" not in body
