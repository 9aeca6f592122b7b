"""Messages between server processes: every type round-trips, bad ones are refused, no torch."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from kestrel import messages as m
from kestrel.outputs import EngineOutput, Logprob
from kestrel.sampling_params import SamplingParams

_LOGPROBS = [{5: Logprob(-0.25, 1), 9: Logprob(-1.5, 2, "x")}]
_POSITION = m.PositionLogprobs(m.TopLogprob(5, "a", -0.25), [m.TopLogprob(5, "a", -0.25), m.TopLogprob(9, "b", -1.5)])
_ADD = m.AddRequest("r-0", [1, 2, 3], SamplingParams(temperature=0.5, stop=["\n"], seed=7, logprobs=2))

EXAMPLES = [
    _ADD,
    m.AbortRequests(["a", "b"]),
    m.GetEngineStats(3),
    m.RequestFailed("r-1", "prompt is empty", is_user_error=True),
    m.TokenBatch(started=[_ADD], failed=[m.RequestFailed("r-2", "boom", False)], aborted=["r-3"],
                 outputs=[EngineOutput("r-0", [5], _LOGPROBS, None), EngineOutput("r-4", [2], None, "stop", 2)]),
    m.EngineReady("/models/x.gguf", 2048, 49152, 10000, [2, 7]),
    m.EngineStats(3, 90, 100, 1, False, "slots leaked"),
    m.TextBatch([m.TextDelta("r-0", "hi", [5], [_POSITION]),
                 m.TextDelta("r-4", "", [2], None, "stop", "\n"),
                 m.TextDelta("r-5", "x", [3], None, "stop", 2)]),
    m.ProcessDied("engine", 1234, -9),
    m.ProcessDied("detokenizer", 1235, 1, is_restarting=True),
    m.EngineHeartbeat(3, 1, 0.25, [m.WorkerStats(0, 1.01, 12, 300, 36, 0.02, 0.05, 3.0, 0.4, 300, 64)]),
    m.Drain(30.0),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_round_trip(message):
    data = m.encode(message)
    assert isinstance(data, bytes)
    back = m.decode(data)
    assert type(back) is type(message)
    assert back == message


def test_every_message_type_has_an_example():
    covered = {type(x) for x in EXAMPLES}
    assert covered == set(m.Message.__args__)


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        m.AbortRequests(["a"]).request_ids = ["b"]  # type: ignore[misc]


def test_sampling_params_are_revalidated_on_decode():
    bad = msgspec.msgpack.encode({"type": "AddRequest", "request_id": "x", "prompt_token_ids": [1],
                                  "params": {"temperature": -1.0}})
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        m.decode(bad)


def test_decoded_sampling_params_keep_tuples():
    back = m.decode(m.encode(_ADD))
    assert back.params.stop == ("\n",) and back.params.stop_token_ids == ()
    assert back.params == _ADD.params


@pytest.mark.parametrize("data", [b"", b"\x00garbage", msgspec.msgpack.encode({"type": "Nope"}),
                                  msgspec.msgpack.encode({"type": "AbortRequests", "request_ids": "not-a-list"})])
def test_malformed_messages_raise_msgspec_errors(data):
    with pytest.raises(msgspec.MsgspecError):
        m.decode(data)


def test_messages_and_api_process_do_not_import_torch():
    code = ("import sys\n"
            "import kestrel.messages, kestrel.server.launcher, kestrel.server.api_server, kestrel.server.commands\n"
            "import kestrel.server.openai_serving, kestrel.server.generate, kestrel.server.detokenizer_proc\n"
            "import kestrel.chat, kestrel.cli\n"
            "from kestrel.server.api_server import build_app\n"
            "from kestrel.server.client import EngineClient\n"
            "from kestrel.server.config import IpcAddresses, ServerConfig\n"
            "build_app(ServerConfig('127.0.0.1', 0, ('m',), 'x'), EngineClient(IpcAddresses.in_dir('/tmp')))\n"
            "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
