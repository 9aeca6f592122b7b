"""End to end: a real `kestrel serve` process (bundled SmolLM2) driven by the official openai client.

The module-scoped `server` starts once (the model loads once) and is stopped with SIGTERM by the
last test, which checks that no child process outlives it. `test_engine_death_*` starts a second,
small server (a tiny random model with the SmolLM2 tokenizer, an API key) and kills its engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import make_tiny_hf_model

_START_TIMEOUT_S = 600
_STOP_TIMEOUT_S = 30
_MAX_MODEL_LEN = 2048
_MESSAGES = [{"role": "system", "content": "You are brief."},
             {"role": "user", "content": "Name three colors."}]
_PROMPT = "The capital of France is"
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str
    saw_503: bool

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_dir, *args: str) -> Server:
    port = _free_port()
    log_path = os.path.join(tmp_dir, f"server-{port}.log")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", "--port", str(port),
                                 "--max-model-len", str(_MAX_MODEL_LEN), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, saw_503=False)
    deadline = time.monotonic() + _START_TIMEOUT_S
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
    _stop(server.proc)
    pytest.fail(f"kestrel serve did not become healthy:\n{server.log()[-5000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _descendants(pid: int) -> set[int]:
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


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_all_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return left
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = _start_server(str(tmp_path_factory.mktemp("serve")), "--kv-cache-memory-gb", "0.25",
                           "--max-num-seqs", "16", "--disable-uvicorn-access-log")
    yield server
    _stop(server.proc)


@pytest.fixture(scope="module")
def tokenizer(server):
    from kestrel.frontend.tokenizer import load_tokenizer
    from kestrel.server.commands import tokenizer_path
    from kestrel.config import EngineConfig

    return load_tokenizer(tokenizer_path(EngineConfig()))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _engine_state(server: Server) -> dict:
    return httpx.get(server.url + "/debug/state", timeout=30).json()


def _wait_engine_idle(server: Server, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = _engine_state(server)
        e = state["engine"]
        is_idle = e["num_free_slots"] + e["num_cached_slots"] == e["num_slots"] and e["num_unfinished_requests"] == 0
        if is_idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


# ---- readiness and metadata -----------------------------------------------------------
def test_health_was_503_until_ready_then_200(server):
    assert server.saw_503
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_models_and_api_process_without_torch(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert _engine_state(server)["api"]["torch_imported"] is False


# ---- chat and completions ---------------------------------------------------------------
def test_chat_usage_matches_tokenizer(client, tokenizer):
    from kestrel.frontend.tokenizer import apply_chat_template

    out = client.chat.completions.create(model=MODEL, messages=_MESSAGES, max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert out.usage.prompt_tokens == len(apply_chat_template(tokenizer, _MESSAGES))
    assert out.usage.completion_tokens == len(choice.logprobs.content) <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert "".join(t.token for t in choice.logprobs.content).startswith(choice.message.content)
    for t in choice.logprobs.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=_MESSAGES, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again
    assert all(c.usage is None for c in chunks[:-1])


def test_cached_tokens_reach_the_usage(server, client):
    """A prompt sharing a long prefix with an earlier one reports the shared tokens as cached, streamed or not."""
    system = "You are a meticulous assistant. Answer every question in a single short sentence. " * 3
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < 40 <= first.usage.prompt_tokens
    other = [chat[0], {"role": "user", "content": "Name a tree."}]
    second = client.chat.completions.create(model=MODEL, messages=other, max_tokens=4, temperature=0)
    assert 40 <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    prompt = system + "Name a bird."
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens - 1
    native = httpx.post(server.url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 2}},
                        timeout=300).json()
    assert native["meta_info"]["cached_tokens"] == native["meta_info"]["prompt_tokens"] - 1
    stats = _engine_state(server)["engine"]
    assert stats["num_prefix_hit_tokens"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1


def test_long_conversation_is_a_400_or_loses_its_oldest_turns(client, tokenizer):
    from kestrel.frontend.tokenizer import apply_chat_template

    turns = [{"role": "system", "content": "You are brief."}]
    for i in range(12):  # ~ 2,400 tokens in all: more than the 2,048 of the context
        turns += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 60},
                  {"role": "assistant", "content": "Sure. " * 40}]
    turns.append({"role": "user", "content": "And finally?"})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=turns, max_tokens=8)
    message = info.value.body["message"]
    prompt_len = len(apply_chat_template(tokenizer, turns))
    assert prompt_len > _MAX_MODEL_LEN and str(_MAX_MODEL_LEN) in message and str(prompt_len) in message
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=8, temperature=0,
                                                           extra_body={"truncate_chat_history": True})
    dropped = int(raw.headers["x-kestrel-dropped-messages"])
    out = raw.parse()
    assert dropped % 2 == 0 and 2 <= dropped < len(turns) - 2
    assert out.usage.prompt_tokens + 8 <= _MAX_MODEL_LEN and out.choices[0].finish_reason in ("stop", "length")


def test_completion_prompt_forms(client, tokenizer):
    ids = tokenizer.encode(_PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=6, temperature=0)
    assert by_text.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[_PROMPT, "1, 2, 3,"], max_tokens=4,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    batch_ids = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=3,
                                          temperature=0)
    assert batch_ids.usage.prompt_tokens == len(ids) + 2


def test_completion_stream_echo_and_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=6,
                                            temperature=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(_PROMPT) and len(text) > len(_PROMPT)
    assert chunks[-1].usage.completion_tokens == 6 or chunks[-2].choices[0].finish_reason == "stop"
    full = client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=6, temperature=0,
                                     echo=True)
    assert full.choices[0].text == text


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=5, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top and len(top) >= 3  # greedy: the chosen token is the top one


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_never_leaks(client, stream):
    base = client.completions.create(prompt=_PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}, model=MODEL)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    kw = dict(model=MODEL, prompt=_PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzzz"],
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(**kw)
        got, finish = out.choices[0].text, out.choices[0].finish_reason
    assert got == expected and stop not in got
    assert finish == "stop"


def test_seed_determinism_and_n(client):
    kw = dict(model=MODEL, messages=_MESSAGES, max_tokens=8, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    two = client.chat.completions.create(seed=1234, n=2, **kw)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.choices[0].message.content == a  # choice i uses seed + i
    assert two.usage.completion_tokens <= 16
    streamed = list(client.completions.create(model=MODEL, prompt=_PROMPT, n=2, max_tokens=4,
                                              seed=5, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_native_generate(server, tokenizer):
    body = {"text": _PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    out = httpx.post(server.url + "/generate", json=body, timeout=300).json()
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) <= 5
    assert out["meta_info"]["prompt_tokens"] == len(tokenizer.encode(_PROMPT))
    by_ids = httpx.post(server.url + "/generate", json={"input_ids": tokenizer.encode(_PROMPT),
                                                        "sampling_params": body["sampling_params"]}, timeout=300)
    assert by_ids.json()["text"] == out["text"]
    with httpx.stream("POST", server.url + "/generate", json=dict(body, stream=True), timeout=300) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["text"] == out["text"]


def test_chat_content_parts_roles_and_extra_params(server, client, tokenizer):
    from kestrel.frontend.tokenizer import apply_chat_template

    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                             {"type": "text", "text": "Answer in words."}]},
                {"role": "assistant", "content": "Four."},
                {"role": "tool", "content": "calculator: 4", "tool_call_id": "c1"},
                {"role": "user", "content": "And 3+3?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, temperature=0.8, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    flat = [dict(m, content="What is 2+2?\nAnswer in words.") if isinstance(m["content"], list) else m
            for m in messages]
    assert out.usage.prompt_tokens == len(apply_chat_template(tokenizer, flat))
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"


def test_stop_token_ids(server, client):
    gen = httpx.post(server.url + "/generate", timeout=300, json={
        "text": _PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}).json()
    ids = gen["output_ids"]
    stop_id = ids[2]
    out = client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == ids.index(stop_id) + 1


# ---- bad input ------------------------------------------------------------------------
_LONG_IDS = [100] * _MAX_MODEL_LEN
BAD_REQUESTS = [
    # (endpoint, body, status, param, words the message must contain)
    ("/v1/chat/completions", '{"messages": [', 400, None, ["JSON"]),
    ("/v1/chat/completions", {"messages": _MESSAGES, "temperature": "hot"}, 400, "temperature", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": "5"}, 400, "max_tokens", []),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", []),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ["empty"]),
    ("/v1/chat/completions", {}, 400, "messages", ["required"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "top_p": 2}, 400, "top_p", ["(0.0, 1.0]"]),
    ("/v1/chat/completions", {"messages": _MESSAGES, "n": 0}, 400, "n", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "presence_penalty": 9}, 400, "presence_penalty", []),
    ("/v1/chat/completions", {"messages": _MESSAGES, "model": "gpt-9"}, 404, "model", ["gpt-9"]),
    ("/v1/completions", {"prompt": _PROMPT, "stop": 3}, 400, "stop", []),
    ("/v1/completions", {"prompt": _PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options", []),
    ("/v1/completions", {"prompt": []}, 400, "prompt", []),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt", ["vocabulary"]),
    ("/v1/completions", {"prompt": _LONG_IDS}, 400, "prompt", [str(_MAX_MODEL_LEN)]),
    ("/v1/completions", {"prompt": [100] * 1000, "max_tokens": 1500}, 400, "max_tokens", ["1000", "1500", "2048"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "messages", ["2048"]),
    ("/generate", {"text": _PROMPT, "sampling_params": {"temperature": -1}}, 400, "sampling_params.temperature", []),
    ("/generate", {"sampling_params": {}}, 400, "text", []),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD_REQUESTS,
                         ids=[f"{i}-{b[0].rsplit('/', 1)[1]}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_openai_error(server, endpoint, body, status, param, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + endpoint, timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_MESSAGES, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_bad_requests_do_not_disturb_others(server, client):
    results: dict[str, object] = {}

    def good(name: str) -> None:
        results[name] = client.completions.create(model=MODEL, prompt=_PROMPT, max_tokens=8,
                                                  temperature=0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=good, args=(f"g{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for row in BAD_REQUESTS:
        test_bad_request_gets_openai_error(server, *row)
    for t in threads:
        t.join()
    texts = {r.choices[0].text for r in results.values()}
    assert len(results) == 3 and len(texts) == 1
    state = _wait_engine_idle(server)
    assert state["engine"]["integrity_ok"] and httpx.get(server.url + "/health").status_code == 200


# ---- disconnects ------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_request(server, stream):
    body = {"prompt": _PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            for _ in range(3):
                while not next(lines).startswith("data: "):
                    pass
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=3)
    state = _wait_engine_idle(server)
    e = state["engine"]
    assert e["num_free_slots"] + e["num_cached_slots"] == e["num_slots"] and e["num_unfinished_requests"] == 0
    assert e["integrity_ok"], e["integrity_error"]
    assert state["api"]["num_in_flight_requests"] == 0


# ---- the `kestrel client` command ---------------------------------------------------------
def test_kestrel_client_command(server):
    out = subprocess.run([sys.executable, "-m", "kestrel.cli", "client", "--url", server.url, "--text", "Hi",
                          "--max-tokens", "5", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "completion tokens" in out.stderr


# ---- a second server: API key, engine death ---------------------------------------------------
def test_engine_death_gives_503_and_sigterm_leaves_no_orphans(tmp_path):
    from kestrel.config import EngineConfig
    from kestrel.server.commands import tokenizer_path

    model_dir = str(tmp_path / "tiny")
    make_tiny_hf_model(model_dir, "llama", vocab_size=49152, max_position_embeddings=_MAX_MODEL_LEN)
    srv = _start_server(str(tmp_path), model_dir, "--tokenizer", tokenizer_path(EngineConfig()),
                        "--api-key", "sekret", "--served-model-name", "tiny", "--kv-cache-memory-gb", "0.05")
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        tiny = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0, timeout=120)
        assert tiny.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        engine_pid = _engine_pid(srv.proc.pid)
        os.kill(engine_pid, signal.SIGKILL)
        _wait_for(lambda: httpx.get(srv.url + "/health").status_code == 503)
        assert "engine process" in httpx.get(srv.url + "/health").json()["detail"]
        with pytest.raises(openai.APIStatusError) as info:
            tiny.completions.create(model="tiny", prompt="Hi", max_tokens=3)
        assert info.value.status_code == 503
        _wait_for(lambda: "died with exit code" in srv.log())
        _sigterm_and_check_no_orphans(srv)
    finally:
        _stop(srv.proc)


def _engine_pid(server_pid: int) -> int:
    """The server's engine process: the one child that maps torch's shared library."""
    for pid in _descendants(server_pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "libtorch" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no engine process under {server_pid}")


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def _sigterm_and_check_no_orphans(srv: Server) -> None:
    children = _descendants(srv.proc.pid)
    assert len(children) >= 2
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(_STOP_TIMEOUT_S) == 0
    assert _wait_all_gone(children) == set(), srv.log()[-3000:]
    assert "all server processes stopped" in srv.log()


# ---- last: stop the module server ----------------------------------------------------------------
def test_sigterm_stops_everything_without_orphans(server):
    """Runs last in this file: SIGTERM with a request in flight, then every child must be gone."""
    children = _descendants(server.proc.pid)
    assert len(children) >= 3  # api, detokenizer, engine (+ multiprocessing's resource tracker)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": _PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
        _sigterm_and_check_no_orphans(server)
