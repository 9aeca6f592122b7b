"""Structured outputs end to end on SmolLM2 (offline API): every output parses and matches its constraint.

22 JSON schemas, greedy and sampled, in batches of 16 mixed with unconstrained requests; greedy ones
again under preemption (a small KV pool), equal to the unpreempted answers (matchers replayed); regex, choice
and EBNF; jump-forward on and off. One model for the module (the session's `smollm_llm`) plus a
small-pool one for preemption.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kestrel import LLM, SamplingParams
from kestrel.structured_outputs import StructuredOutputsParams
from tests.structured_schemas import SCHEMAS

_MAX_TOKENS = 96


def _conversation(schema: dict) -> list[dict]:
    keys = ", ".join(schema.get("properties", {})) or "a list"
    return [{"role": "user", "content": f"Reply in JSON ({keys})."}]


def _schema_params(schema: dict, sampled: bool, seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature=0.7 if sampled else 0, seed=seed if sampled else None, max_tokens=_MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=schema))


def _assert_valid(text: str, schema: dict, finish_reason: str) -> None:
    assert finish_reason == "stop", f"cut at max_tokens: {text!r}"
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def llm(smollm_llm):
    smollm_llm.engine.structured.jump_forward = True
    yield smollm_llm
    smollm_llm.engine.structured.jump_forward = True


@pytest.fixture(scope="module")
def batch_results(llm) -> dict[tuple[int, bool], tuple[str, str]]:
    """(schema index, sampled) -> (text, finish reason): 44 constrained requests in batches of 16, each
    batch 12 constrained + 4 free ones."""
    jobs = [(i, sampled) for sampled in (False, True) for i in range(len(SCHEMAS))]
    free = [{"role": "user", "content": "Tell me about the sea."}]
    results = {}
    for at in range(0, len(jobs), 12):
        chunk = jobs[at:at + 12]
        convs = [_conversation(SCHEMAS[i]) for i, _ in chunk] + [free] * 4
        params = [_schema_params(SCHEMAS[i], sampled, seed=i) for i, sampled in chunk]
        params += [SamplingParams(temperature=0.8, seed=i, max_tokens=16) for i in range(4)]
        outs = llm.chat(convs, params, use_tqdm=False)
        for out, job in zip(outs, chunk):
            results[job] = (out.outputs[0].text, out.outputs[0].finish_reason)
        for out in outs[len(chunk):]:
            assert out.outputs[0].token_ids and out.outputs[0].finish_reason in ("stop", "length")
    return results


def test_every_schema_greedy_and_sampled_validates_at_batch_16_with_free_requests(llm, batch_results):
    for (i, _), (text, finish_reason) in batch_results.items():
        _assert_valid(text, SCHEMAS[i], finish_reason)
    assert llm.engine.structured.num_jump_forward_tokens > 0


def test_under_preemption_outputs_validate_and_greedy_ones_are_unchanged(batch_results):
    small = LLM(dtype="float32", show_progress=False, max_model_len=256, num_kv_slots=300, max_num_seqs=8,
                enable_prefix_caching=False)  # shared chat-template prefixes would leave room: no preemption
    picks = list(range(0, len(SCHEMAS), 3))[:8]
    outs = small.chat([_conversation(SCHEMAS[i]) for i in picks],
                      [_schema_params(SCHEMAS[i], False) for i in picks], use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for out, i in zip(outs, picks):
        _assert_valid(out.outputs[0].text, SCHEMAS[i], out.outputs[0].finish_reason)
        assert out.outputs[0].text == batch_results[i, False][0]
    small.engine.check_integrity()
    small.engine.shutdown()


@pytest.mark.parametrize("sampled", [False, True])
def test_regex_choice_and_ebnf(llm, sampled):
    regex = r"(Mon|Tue|Wed)-[0-9]{2}:[0-9]{2}"
    choices = ("yes", "no", "maybe not")
    ebnf = 'root ::= "(" num ", " num ")"\nnum ::= [1-9] [0-9]?'
    constraints = [StructuredOutputsParams(regex=regex), StructuredOutputsParams(choice=choices),
                   StructuredOutputsParams(grammar=ebnf)]
    params = [SamplingParams(temperature=0.9 if sampled else 0, seed=7, max_tokens=24, structured_outputs=c)
              for c in constraints]
    prompts = ["Pick a day and a time.", "Is the sky green?", "Give me a pair of numbers."]
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(regex, texts[0]), texts[0]
    assert texts[1] in choices
    assert re.fullmatch(r"\([1-9][0-9]?, [1-9][0-9]?\)", texts[2]), texts[2]


def test_jump_forward_on_and_off_both_valid_and_on_takes_fewer_steps_than_tokens(llm):
    engine = llm.engine
    schema = SCHEMAS[0]  # forced runs: '{"name": "' and '", "age": '
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(_conversation(schema), tokenize=False,
                                                                    add_generation_prompt=True))
    runs = {}
    for jump in (False, True):
        engine.structured.jump_forward = jump
        before = engine.structured.num_jump_forward_tokens
        engine.add_request(f"jf-{jump}", prompt, SamplingParams(temperature=0, max_tokens=40,
                                                                structured_outputs=StructuredOutputsParams(json=schema)))
        tokens, steps = [], 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.new_token_ids
                steps += 1
        runs[jump] = (tokens, steps, engine.structured.num_jump_forward_tokens - before)
    engine.structured.jump_forward = True
    for tokens, _, _ in runs.values():
        text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)
    assert runs[False][2] == 0 and runs[False][1] == len(runs[False][0])
    tokens, steps, jumped = runs[True]
    assert jumped > 0 and steps < len(tokens)


def test_bad_constraints_are_refused_naming_the_field(llm):
    with pytest.raises(ValueError, match="Invalid JSON schema in 'structured_outputs'"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "objectx"})),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="Invalid regex in 'structured_outputs'.*parenthesis"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b")), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", grammar='root ::= "a"')
    assert not llm.engine.has_unfinished_requests()


def test_compiled_grammars_are_cached_by_text(llm):
    compiler = llm.engine.structured.compiler
    spec = StructuredOutputsParams(regex="[a-z]{3}")
    compiler.compile(spec)
    num = compiler.num_compiled
    assert compiler.compile(StructuredOutputsParams(regex="[a-z]{3}")) is compiler.compile(spec)
    assert compiler.num_compiled == num
