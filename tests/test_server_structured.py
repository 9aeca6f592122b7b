"""Structured outputs and tool calls through a real `kestrel serve` and the official openai client.

response_format (json_schema, json_object), vLLM's structured_outputs / guided_*, SGLang's regex /
json_schema / ebnf in /generate, tools with tool_choice required / named / auto / none, streaming
tool-call deltas reassembled into the non-streamed call, tool messages in the history, and 400s
naming the field for constraints that are bad or unsupported. One server for the module.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server_harness import start_server as _start_server, stop as _stop
from tests.test_server_e2e import MODEL

_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["name", "age"]}
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
_TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, openai client): one `kestrel serve` for the module."""
    srv = _start_server(str(tmp_path_factory.mktemp("serve_structured")), "--kv-cache-memory-gb", "0.25",
                        "--max-num-seqs", "16", "--disable-uvicorn-access-log")
    try:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    finally:
        _stop(srv.proc)


server = pytest.fixture(scope="module", name="server")(lambda served: served[0])
client = pytest.fixture(scope="module", name="client")(lambda served: served[1])


def test_response_format_json_schema_and_json_object(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person in JSON."}], temperature=0,
        max_tokens=64, response_format={"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": _SCHEMA, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), _SCHEMA)
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A cat as JSON."}],
                                         max_tokens=48, temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_fields_on_completions_and_streaming(client):
    regex = r"[A-Z][a-z]{2,6} [0-9]{1,2}"
    out = client.completions.create(model=MODEL, prompt="A month and a day:", max_tokens=16, temperature=0,
                                    extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, out.choices[0].text), out.choices[0].text
    choice = client.completions.create(model=MODEL, prompt="Is water wet?", max_tokens=8, temperature=0.7, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=64, temperature=0,
        stream=True, extra_body={"guided_json": _SCHEMA}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), _SCHEMA)


def test_native_generate_regex_json_schema_and_ebnf(server):
    def generate(**constraint) -> str:
        body = {"text": "Answer:", "sampling_params": {"max_new_tokens": 40, "temperature": 0, **constraint}}
        r = httpx.post(server.url + "/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    assert re.fullmatch(r"(red|blue)-[0-9]{3}", generate(regex=r"(red|blue)-[0-9]{3}"))
    jsonschema.validate(json.loads(generate(json_schema=json.dumps(_SCHEMA))), _SCHEMA)
    assert re.fullmatch(r"(up|down)(, (up|down)){0,2}\.",
                        generate(ebnf='root ::= move (", " move){0,2} "."\nmove ::= "up" | "down"'))


def test_tool_choice_required_and_named_always_parse(client):
    for tool_choice, names in (("required", {"get_weather", "get_time"}),
                               ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        out = client.chat.completions.create(model=MODEL, messages=_ASK, tools=[_WEATHER, _TIME],
                                             tool_choice=tool_choice, max_tokens=64, temperature=0)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        tool = _WEATHER if call.function.name == "get_weather" else _TIME
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(client):
    kw = dict(model=MODEL, messages=_ASK, tools=[_WEATHER, _TIME], tool_choice="required", max_tokens=64,
              temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (full.function.name, full.function.arguments)
    assert sum(1 for c in chunks for d in (c.choices[0].delta.tool_calls or []) if c.choices) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_and_none_and_tool_messages_in_the_history(client):
    history = [*_ASK, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=[_WEATHER], tool_choice="auto",
                                         max_tokens=24, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    none = client.chat.completions.create(model=MODEL, messages=_ASK, tools=[_WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")


_BAD = [
    # (endpoint, body, param, words)
    ("/v1/chat/completions", {"messages": _ASK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", ["Invalid JSON schema", "objectx"]),
    ("/v1/chat/completions", {"messages": _ASK, "response_format": {"type": "xml"}}, "response_format", []),
    ("/v1/chat/completions", {"messages": _ASK, "response_format": {"type": "json_schema"}}, "response_format", []),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a(b"}, "guided_regex", ["Invalid regex", "parenthesis"]),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= "}, "guided_grammar", ["Invalid grammar"]),
    ("/v1/completions", {"prompt": "x", "guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["at most one"]),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, "guided_choice", []),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs", []),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_whitespace_pattern": " "},
     "guided_whitespace_pattern", []),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_decoding_backend": "outlines"},
     "guided_decoding_backend", []),
    ("/v1/chat/completions", {"messages": _ASK, "tools": [_WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "launch"}}},
     "tool_choice", ["launch", "get_weather"]),
    ("/v1/chat/completions", {"messages": _ASK, "tool_choice": "required"}, "tool_choice", []),
    ("/v1/chat/completions", {"messages": _ASK, "tools": [{"type": "function"}]}, "tools", []),
    ("/v1/chat/completions", {"messages": _ASK, "tools": [_WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format", ["at most one"]),
    ("/generate", {"text": "x", "sampling_params": {"regex": "(("}}, "sampling_params.regex", ["Invalid regex"]),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}, "sampling_params.ebnf",
     []),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint,body,param,words", _BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(_BAD)])
def test_bad_constraints_get_400_naming_the_field(server, endpoint, body, param, words, stream):
    r = httpx.post(server.url + endpoint, json=dict(body, stream=stream), timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def test_the_openai_client_sees_the_400(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 5}}})
    assert info.value.body["param"] == "response_format"
    state = httpx.get(server.url + "/debug/state", timeout=30).json()
    assert state["engine"]["integrity_ok"]
