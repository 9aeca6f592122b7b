"""Shared fixtures: tiny random Hugging Face models saved as safetensors folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def make_tiny_hf_model(path: str, arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random model of the given architecture to `path`; return the HF module (fp32)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Random init of transformers leaves biases at zero; make them count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    model = model.float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def train_bpe_tokenizer(corpus: str, eos_token: str):
    """A small byte-level BPE tokenizer (vocabulary 300) trained on `corpus`, as transformers loads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    make_tiny_hf_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def smollm_llm():
    """The bundled SmolLM2-135M-Instruct through the offline API, fp32, loaded once per session."""
    from kestrel import LLM

    return LLM(dtype="float32", show_progress=False, max_model_len=2048)
