"""Rebuild a Hugging Face fast tokenizer from a GGUF file's metadata.

A GGUF file carries no ``tokenizer.json``; llama.cpp stores the vocabulary
(``tokenizer.ggml.tokens``), BPE merges, token types, special token ids, the
chat template and the name of the pre-tokenizer (``tokenizer.ggml.pre``).
This module owns turning those into a ``transformers.PreTrainedTokenizerFast``
that encodes exactly as the model's original tokenizer did.

Input: a GGUF path. Output: a tokenizer with bos/eos/unk/pad tokens, the chat
template, control tokens as special tokens and user-defined tokens as added
tokens. Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported.
No torch here (frontend layer).
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

# Llama 3: contractions, letters with one optional leading non-letter, numbers in groups of 1-3.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: as Llama 3, but every digit is its own piece.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_FAMILIES = {
    "gpt-2": ("gpt-2", "gpt2", "default", "phi-2"),
    "smollm": ("smollm", "starcoder", "refact"),
    "llama-bpe": ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"),
    "qwen2": ("qwen2", "deepseek-r1-qwen"),
}
_PRE_ALIASES = {alias: family for family, aliases in _PRE_FAMILIES.items() for alias in aliases}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_ALIASES))
"""Values of ``tokenizer.ggml.pre`` this module can rebuild."""


def tokenizer_from_gguf(path: str) -> transformers.PreTrainedTokenizerFast:
    """Build the fast tokenizer described by the GGUF file at ``path``."""
    meta = _read_tokenizer_metadata(path)
    model_kind = meta.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(
            f"{path!r}: tokenizer.ggml.model {model_kind!r} is not supported; only 'gpt2' "
            "(byte-level BPE) tokenizers can be rebuilt from GGUF. Load the model's Hugging Face "
            "tokenizer instead (pass --tokenizer with a Hugging Face repo or folder)."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    family = _pre_family(path, meta.get("tokenizer.ggml.pre") or "default")
    backend = _byte_level_bpe(path, tokens, meta.get("tokenizer.ggml.merges"), family)
    control_tokens = _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type"))

    special = {
        name: _token_at(path, tokens, meta.get(f"tokenizer.ggml.{key}"), key)
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
    }
    # llama.cpp's default for the Llama 3 family is to add BOS; the file's flag wins when present.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", family == "llama-bpe"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(meta, special, add_bos, add_eos)
    kwargs: dict[str, Any] = {name: tok for name, tok in special.items() if tok is not None}
    # Listed so that all_special_ids (used to skip tokens when detokenizing) covers every control token.
    kwargs["additional_special_tokens"] = [t for t in control_tokens if t not in special.values()]
    context_len = meta.get("context_length")
    if context_len:
        kwargs["model_max_length"] = int(context_len)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos and special["bos_token"] is not None,
        add_eos_token=add_eos and special["eos_token"] is not None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata (plus ``context_length``) as plain Python values."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF tokenizer {path!r}: no such file")
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if not is_gguf:
        raise ValueError(f"{path!r} is not a valid GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on bad input
        raise ValueError(f"{path!r} is not a valid or complete GGUF file: {type(e).__name__}: {e}") from e
    meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path!r}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    arch_field = reader.fields.get("general.architecture")
    if arch_field is not None:
        ctx_field = reader.fields.get(f"{arch_field.contents()}.context_length")
        meta["context_length"] = None if ctx_field is None else ctx_field.contents()
    return meta


def _pre_family(path: str, pre: str) -> str:
    family = _PRE_ALIASES.get(pre)
    if family is None:
        raise ValueError(
            f"{path!r}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    return family


def _byte_level_bpe(path: str, tokens: list[str], merges: list[str] | None, family: str) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the pre-tokenizer of ``family``."""
    if not merges:
        raise ValueError(f"{path!r}: a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges, which is missing")
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a duplicated string keeps its first id, as llama.cpp does
    merge_pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{path!r}: malformed BPE merge {merge!r} (expected 'left right')")
        merge_pairs.append((left, right))
    # Llama 3's tokenizer.json sets ignore_merges: a pre-token that is a whole vocab entry is kept as is.
    bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False,
                     ignore_merges=family == "llama-bpe")
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(family)
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    """How text is cut into pieces before BPE, per ``tokenizer.ggml.pre`` family."""
    if family == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if family == "smollm":  # upstream SmolLM tokenizer.json: every digit is its own pre-token
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    split = _LLAMA3_SPLIT if family == "llama-bpe" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _add_special_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int] | None) -> list[str]:
    """Control tokens become special tokens; user-defined ones plain added tokens (both matched whole).

    llama.cpp marks a Hugging Face added token CONTROL when it is special (``<|im_start|>``) and
    USER_DEFINED when it is not (e.g. Qwen's ``<tool_call>``); keeping that split means
    ``skip_special_tokens`` drops the same tokens Hugging Face would. Returns the control tokens.
    """
    if not token_types:
        return []
    control = [AddedToken(tok, special=True, normalized=False)
               for tok, kind in zip(tokens, token_types) if kind == _CONTROL and tok]
    user_defined = [AddedToken(tok, special=False, normalized=False)
                    for tok, kind in zip(tokens, token_types) if kind == _USER_DEFINED and tok]
    if control:
        backend.add_special_tokens(control)
    if user_defined:
        backend.add_tokens(user_defined)
    return [str(t.content) for t in control]


def _token_at(path: str, tokens: list[str], token_id: int | None, key: str) -> str | None:
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise ValueError(f"{path!r}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                         f"of {len(tokens)} tokens")
    return tokens[int(token_id)]


def _post_processor(meta: dict, special: dict, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """BOS/EOS insertion as a TemplateProcessing (``$A`` alone when neither is added)."""
    bos, eos = special["bos_token"], special["eos_token"]
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    prefix = f"{bos}:0 " if add_bos else ""
    suffix = f" {eos}:0" if add_eos else ""
    single = f"{prefix}$A:0{suffix}"
    pair = f"{single} {prefix.replace(':0', ':1')}$B:1{suffix.replace(':0', ':1')}"
    ids = {}
    if add_bos:
        ids[bos] = int(meta["tokenizer.ggml.bos_token_id"])
    if add_eos:
        ids[eos] = int(meta["tokenizer.ggml.eos_token_id"])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
