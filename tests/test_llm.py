"""The offline API on the bundled SmolLM2: input forms, n, logprobs, stop strings, validation."""

from __future__ import annotations

import math

import pytest

from kestrel.sampling_params import SamplingParams

GREEDY = dict(temperature=0, max_tokens=24)


def test_generate_accepts_strings_and_token_ids(smollm_llm):
    tok = smollm_llm.get_tokenizer()
    text = "The capital of France is"
    ids = tok.encode(text)
    by_text, by_ids = smollm_llm.generate([text, {"prompt_token_ids": ids}], SamplingParams(**GREEDY),
                                          use_tqdm=False)
    assert by_text.prompt_token_ids == ids == by_ids.prompt_token_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == tok.decode(by_text.outputs[0].token_ids, skip_special_tokens=True)
    single = smollm_llm.generate(text, SamplingParams(**GREEDY), use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == by_text.outputs[0].token_ids


def test_chat_applies_template_and_finishes(smollm_llm):
    outs = smollm_llm.chat([[{"role": "user", "content": "Say hello."}],
                            [{"role": "user", "content": "What is 2+2?"}]],
                           SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        assert "<|im_start|>assistant" in out.prompt
        comp = out.outputs[0]
        assert comp.finish_reason in ("stop", "length") and comp.text.strip()
        assert "<|im_end|>" not in comp.text


def test_stop_strings_never_leak(smollm_llm):
    prompt = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    free = smollm_llm.chat(prompt, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 10
    # Stop on text that the free run really produced, in the middle of the output.
    mid = len(free.text) // 2
    for stop in [free.text[5:8], free.text[mid: mid + 2], free.text[-3:]]:
        if not stop.strip():
            continue
        out = smollm_llm.chat(prompt, SamplingParams(temperature=0, max_tokens=60, stop=[stop]),
                              use_tqdm=False)[0].outputs[0]
        assert stop not in out.text
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert free.text.startswith(out.text)
        kept = smollm_llm.chat(prompt, SamplingParams(temperature=0, max_tokens=60, stop=[stop],
                                                      include_stop_str_in_output=True), use_tqdm=False)
        assert kept[0].outputs[0].text == out.text + stop


def test_n_and_seed(smollm_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    first = smollm_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    again = smollm_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_logprobs(smollm_llm):
    out = smollm_llm.generate("The sun rises in the", SamplingParams(temperature=0, max_tokens=5, logprobs=3),
                              use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for tok_id, lp in zip(out.token_ids, out.logprobs):
        assert tok_id in lp and lp[tok_id].rank == 1  # greedy picks the top token
        assert 3 <= len(lp) <= 4
        assert all(v.logprob <= 0 for v in lp.values())
        assert max(v.logprob for v in lp.values()) == lp[tok_id].logprob
    assert math.isclose(out.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)))


def test_max_tokens_and_eos(smollm_llm):
    out = smollm_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    chat = smollm_llm.chat([{"role": "user", "content": "Reply with one word: yes."}],
                           SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop"
    assert chat.token_ids[-1] in smollm_llm.engine.model_config.eos_token_ids


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(min_p=2), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(temperature="hot"), "temperature"), (dict(min_tokens=5, max_tokens=2),
                                                                          "min_tokens"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_leave_engine_clean(smollm_llm):
    with pytest.raises(ValueError, match="empty"):
        smollm_llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        smollm_llm.generate({"prompt_token_ids": [1, 10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="context length"):
        smollm_llm.generate({"prompt_token_ids": [5] * 5000}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        smollm_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    assert not smollm_llm.engine.has_unfinished_requests()
    smollm_llm.engine.check_integrity()
