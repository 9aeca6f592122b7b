"""Load the tokenizer (and chat template) that belongs to a model.

A Hugging Face folder uses its own tokenizer files (offline); a GGUF file's
tokenizer is rebuilt from its metadata. Returns a transformers
`PreTrainedTokenizerFast` either way, so encode/decode/apply_chat_template
behave the same for both.
"""

from __future__ import annotations

import os

from kestrel.frontend.gguf_tokenizer import tokenizer_from_gguf


def load_tokenizer(path: str):
    if os.path.isfile(path):
        return tokenizer_from_gguf(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    """Render a conversation with the model's chat template and return its token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use generate() with a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)
