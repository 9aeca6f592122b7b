"""The server's engine loop and detokenizer stage, in-process (no HTTP, no subprocesses).

The engine loop runs a tiny random Llama behind real ZMQ sockets (inproc); the detokenizer stage
runs on a small byte-level BPE tokenizer trained here.
"""

from __future__ import annotations

import pytest
import zmq
from transformers import PreTrainedTokenizerFast

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.messages import (AbortRequests, AddRequest, EngineStats, GetEngineStats, TokenBatch, decode,
                              encode)
from kestrel.outputs import EngineOutput, Logprob
from kestrel.sampling_params import SamplingParams
from kestrel.server.detokenizer_proc import Detokenizer
from kestrel.server.engine_proc import EngineLoop
from tests.conftest import train_bpe_tokenizer


# ---- engine loop ---------------------------------------------------------------------
class _Harness:
    """An EngineLoop between two inproc sockets: `send` feeds its inbox, `drain` reads its outbox."""

    def __init__(self, engine: Engine) -> None:
        self.ctx = zmq.Context()
        inbox, self._to_loop = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        inbox.bind("inproc://engine")
        self._to_loop.connect("inproc://engine")
        outbox, self._from_loop = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self._from_loop.bind("inproc://detok")
        outbox.connect("inproc://detok")
        self.loop = EngineLoop(engine, inbox, outbox)

    def send(self, message) -> None:
        self._to_loop.send(encode(message))

    def drain(self) -> list:
        out = []
        while self._from_loop.poll(0):
            out.append(decode(self._from_loop.recv()))
        return out

    def run_until_idle(self, max_iterations: int = 200) -> list:
        messages = []
        self.loop.run_once()
        for _ in range(max_iterations):
            messages += self.drain()
            if not self.loop.engine.has_unfinished_requests():
                break
            self.loop.run_once()
        return messages + self.drain()

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def harness(tiny_llama_dir):
    h = _Harness(Engine(EngineConfig(model=tiny_llama_dir, show_progress=False, num_kv_slots=512)))
    yield h
    h.close()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _outputs(messages) -> dict[str, list[EngineOutput]]:
    got: dict[str, list[EngineOutput]] = {}
    for m in messages:
        if isinstance(m, TokenBatch):
            for out in m.outputs:
                got.setdefault(out.request_id, []).append(out)
    return got


def test_loop_runs_requests_and_reports_failures(harness):
    harness.send(AddRequest("ok", [5, 6, 7], _greedy(4)))
    harness.send(AddRequest("empty", [], _greedy(4)))
    harness.send(AddRequest("oov", [5, 10**6], _greedy(4)))
    messages = harness.run_until_idle()
    batches = [m for m in messages if isinstance(m, TokenBatch)]
    assert [a.request_id for a in batches[0].started] == ["ok"]
    failed = {f.request_id: f for b in batches for f in b.failed}
    assert set(failed) == {"empty", "oov"} and all(f.is_user_error for f in failed.values())
    assert "empty" in failed["empty"].message
    outs = _outputs(messages)["ok"]
    assert len(outs) == 4 and outs[-1].finish_reason == "length"


def test_abort_frees_slots_and_stats_report_integrity(harness):
    harness.send(AddRequest("long", [5, 6, 7], _greedy(100)))
    for _ in range(3):
        harness.loop.run_once()
    harness.send(AbortRequests(["long", "unknown"]))
    messages = harness.run_until_idle()
    assert ["long"] == [rid for m in messages if isinstance(m, TokenBatch) for rid in m.aborted]
    harness.send(GetEngineStats(7))
    harness.loop.run_once()
    stats = [m for m in harness.drain() if isinstance(m, EngineStats)]
    assert len(stats) == 1 and stats[0].nonce == 7
    assert stats[0].num_free_slots + stats[0].num_cached_slots == stats[0].num_slots == 512
    assert stats[0].integrity_ok and stats[0].num_unfinished_requests == 0


def test_a_failing_step_fails_its_requests_but_not_the_loop(harness, monkeypatch):
    real_step = harness.loop.engine.step
    harness.send(AddRequest("a", [5, 6], _greedy(5)))
    harness.send(AddRequest("b", [7, 8], _greedy(5)))

    def broken_step():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(harness.loop.engine, "step", broken_step)
    harness.loop.run_once()
    failed = [f for m in harness.drain() if isinstance(m, TokenBatch) for f in m.failed]
    assert {f.request_id for f in failed} == {"a", "b"}
    assert not any(f.is_user_error for f in failed) and "internal engine error" in failed[0].message
    assert "kernel exploded" not in failed[0].message  # no Python internals in what clients see
    monkeypatch.setattr(harness.loop.engine, "step", real_step)
    harness.send(AddRequest("c", [5, 6], _greedy(3)))
    assert len(_outputs(harness.run_until_idle())["c"]) == 3
    harness.loop.engine.check_integrity()
    assert harness.loop.engine.kv_manager.num_available_slots == 512


# ---- detokenizer stage -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer("hello world, the stop word is STOP and then more text", "<eos>")


def _batch(started=(), aborted=(), outputs=()) -> TokenBatch:
    return TokenBatch(list(started), [], list(aborted), list(outputs))


def test_detokenizer_cuts_at_stop_string_and_asks_for_abort(tokenizer):
    detok = Detokenizer(tokenizer)
    ids = tokenizer.encode("hello world STOP and then")
    params = SamplingParams(stop=["STOP"], max_tokens=50)
    result = detok.process(_batch(started=[AddRequest("r", tokenizer.encode("the"), params)]))
    assert result.deltas == [] and detok.num_live == 1
    text, finish = "", None
    for token_id in ids:
        result = detok.process(_batch(outputs=[EngineOutput("r", [token_id], None, None)]))
        for d in result.deltas:
            text += d.text
            finish = d.finish_reason or finish
            if d.finish_reason:
                assert result.to_abort == ["r"] and d.stop_reason == "STOP"
    assert text == "hello world " and finish == "stop"
    assert detok.num_live == 0  # later tokens of the aborted request are ignored
    assert detok.process(_batch(outputs=[EngineOutput("r", [ids[-1]], None, None)])).deltas == []


def test_detokenizer_flushes_on_length_and_drops_aborted(tokenizer):
    detok = Detokenizer(tokenizer)
    ids = tokenizer.encode("hello world")
    add = [AddRequest("a", [1], SamplingParams(logprobs=1)), AddRequest("b", [1], SamplingParams())]
    lp = [{ids[0]: Logprob(-0.5, 1), 3: Logprob(-2.0, 2)}]
    r1 = detok.process(_batch(started=add, outputs=[EngineOutput("a", ids[:1], lp, None)]))
    assert r1.deltas[0].logprobs[0].chosen.token_id == ids[0]
    assert [t.token_id for t in r1.deltas[0].logprobs[0].top] == [ids[0]]
    r2 = detok.process(_batch(aborted=["b"], outputs=[EngineOutput("a", ids[1:], None, "length")]))
    assert r2.deltas[0].finish_reason == "length" and r2.to_abort == []
    assert r1.deltas[0].text + r2.deltas[0].text == "hello world"
    assert detok.num_live == 0


def test_an_id_aborted_and_added_again_in_one_drain_keeps_the_new_request(harness, tokenizer):
    """A stop string's abort (from the detokenizer) and a new request reusing the id (from the API, e.g.
    /generate's rid sent again right after the reply) can reach the engine in one inbox drain. The
    detokenizer must see the abort before the new start, or it forgets the new request, which hangs."""
    detok = Detokenizer(tokenizer)
    harness.send(AddRequest("r-0", [5, 6, 7], _greedy(100)))
    for _ in range(3):
        harness.loop.run_once()
    harness.send(AbortRequests(["r-0"]))
    harness.send(AddRequest("r-0", [5, 6], _greedy(4)))
    messages = harness.run_until_idle()
    deltas = [d for m in messages if isinstance(m, TokenBatch) for d in detok.process(m).deltas]
    assert deltas[-1].request_id == "r-0" and deltas[-1].finish_reason == "length"
    assert detok.num_live == 0
