"""Fidelity on the bundled SmolLM2-135M-Instruct: greedy tokens identical to transformers (fp32).

transformers loads the same GGUF file with its own dequantizer and Q/K un-permutation, so this
also checks Kestrel's GGUF path end to end.
"""

from __future__ import annotations

import os

import pytest
import torch

from kestrel.models.loader import default_model_path
from kestrel.sampling_params import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a name for a pet kestrel.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "Café, naïve, résumé: what do these words have in common?",
]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def test_greedy_tokens_match_transformers(smollm_llm, hf_model):
    tok = smollm_llm.get_tokenizer()
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in PROMPTS]
    prompt_ids = [tok.encode(t, add_special_tokens=False) for t in prompt_ids]
    # min_tokens blocks EOS exactly like transformers' min_new_tokens, so both run 32 steps.
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)
    ours = smollm_llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    for ids, out in zip(prompt_ids, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                                    do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), tok.decode(ids)
