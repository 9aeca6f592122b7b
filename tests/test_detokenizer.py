"""Tests for kestrel.frontend.detokenizer: streaming equals full decode, UTF-8 safety, stop strings.

Tokenizers are built offline in-process: a byte-level BPE (GPT-2 style), a Llama-style BPE with
byte fallback (`<0xNN>` tokens, so emoji and CJK split into single bytes) and a Metaspace BPE
(SentencePiece-style leading spaces).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kestrel.frontend.detokenizer import DetokenizerDelta, IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a small corpus for the detokenizer tests.",
    "Café crème brûlée — naïve façade; Ærøskøbing and São Paulo.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷 with family 👨‍👩‍👧.",
    "The quick brown fox jumps over the lazy dog. 1234567890!?",
    "  indented   spaces\tand\ttabs\nnew lines\n\n",
]
PIECES = list("abcdefghij ABC .,!?\n\t") + [
    "é", "ñ", "ü", "ß", "Æ", "日", "本", "語", "中", "文", "한", "국", "😀", "🎉", "👍🏽", "🇫🇷",
    "👨‍👩‍👧", "—", "€", "𝄞", " the", " world", "  ", " quick brown",
]  # fmt: skip


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _llama_like() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([line for line in CORPUS if "Emoji" not in line] * 3, trainer)
    data = json.loads(tok.to_str())  # below: emoji (never seen in training) fall back to bytes
    vocab = data["model"]["vocab"]
    num_base = len(vocab)
    vocab.update({f"<0x{b:02X}>": num_base + b for b in range(256)})
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by the ByteLevel pre-tokenizer and decoder."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def _handmade_byte_level(pieces: list[bytes]) -> tuple[PreTrainedTokenizerFast, dict[bytes, int]]:
    """Byte-level BPE whose tokens are the 256 bytes plus `pieces` (which may split characters)."""
    chars = _byte_level_chars()
    vocab = {chars[b]: b for b in range(256)}
    ids = {bytes([b]): b for b in range(256)}
    for piece in pieces:
        ids[piece] = vocab["".join(chars[b] for b in piece)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok), ids


TOKENIZERS = {"byte_level": _byte_level(), "llama_like": _llama_like(), "metaspace": _metaspace()}


def _random_text(rng: random.Random, max_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None, max_chunk=1):
    """Feed ids in chunks of 1..max_chunk tokens; return the deltas and the flushed text."""
    deltas, pos = [], 0
    while pos < len(ids) and not detok.is_stopped:
        num = rng.randint(1, max_chunk) if rng else max_chunk
        deltas.append(detok.add_tokens(ids[pos : pos + num]))
        pos += num
    return deltas, detok.flush()


def _expected_after_prompt(tokenizer, prompt_ids, output_ids, skip=True) -> str:
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=skip)
    full_text = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


# ---------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("max_chunk", [1, 3, 7])
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_stream_equals_full_decode(name, max_chunk):
    tokenizer, rng = TOKENIZERS[name], random.Random(max_chunk)
    for _ in range(150):
        prompt_ids = _encode(tokenizer, _random_text(rng, 10))
        output_ids = _encode(tokenizer, _random_text(rng, 40))
        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        deltas, tail = _stream(detok, output_ids, rng, max_chunk)
        texts = [d.text for d in deltas]
        assert "".join(texts) + tail == detok.output_text
        assert detok.output_text == _expected_after_prompt(tokenizer, prompt_ids, output_ids)
        assert not any("\ufffd" in t for t in texts + [tail])  # never a partial character
        assert all(d.stop_str is None for d in deltas) and not detok.is_stopped


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_empty_prompt_equals_decode_of_output(name):
    tokenizer, rng = TOKENIZERS[name], random.Random(1)
    for _ in range(100):
        output_ids = _encode(tokenizer, _random_text(rng, 30))
        detok = IncrementalDetokenizer(tokenizer, [])
        _stream(detok, output_ids)
        assert detok.output_text == tokenizer.decode(output_ids, skip_special_tokens=True)


def test_byte_level_output_equals_decode_of_output_ids_whatever_the_prompt():
    tokenizer, rng = TOKENIZERS["byte_level"], random.Random(2)
    for _ in range(100):
        prompt_ids = _encode(tokenizer, _random_text(rng, 10))
        output_ids = _encode(tokenizer, _random_text(rng, 30))
        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        _stream(detok, output_ids, rng, 4)
        assert detok.output_text == tokenizer.decode(output_ids)


def test_byte_fallback_holds_emoji_until_complete():
    tokenizer = TOKENIZERS["llama_like"]
    ids = _encode(tokenizer, "Hello 😀")
    assert tokenizer.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detok = IncrementalDetokenizer(tokenizer, ids[:-4])
    assert [detok.add_tokens([i]).text for i in ids[-4:]] == ["", "", "", "😀"]
    assert detok.output_text == "😀"


def test_flush_releases_an_unfinished_character_as_decode_shows_it():
    tokenizer = TOKENIZERS["llama_like"]
    ids = _encode(tokenizer, "é😀")[:-2]  # cut the emoji after two of its four bytes
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.add_tokens([i]).text for i in ids) == "é"
    assert detok.flush() == tokenizer.decode(ids)[1:] and "\ufffd" in detok.output_text
    assert detok.output_text == tokenizer.decode(ids)
    assert detok.flush() == "" and detok.add_tokens(ids) == DetokenizerDelta("", None)


def test_token_with_text_and_a_leading_byte():
    tokenizer, ids = _handmade_byte_level([b"ab\xf0"])  # text, then the first byte of 😀
    rest = [ids[b"\x9f"], ids[b"\x98"], ids[b"\x80"]]
    detok = IncrementalDetokenizer(tokenizer, [ids[b"x"]])
    assert detok.add_tokens([ids[b"ab\xf0"]]).text == "ab"  # not the unfinished character
    assert detok.add_tokens(rest[:1]).text == ""
    assert detok.add_tokens(rest[1:] + [ids[b"y"]]).text == "😀y"
    assert detok.output_text == tokenizer.decode([ids[b"ab\xf0"]] + rest + [ids[b"y"]])


@pytest.mark.parametrize("max_chunk", [1, 3])
def test_long_run_of_tokens_that_all_end_inside_a_character(max_chunk):
    # 😀 is F0 9F 98 80; every token below ends after F0 9F, so no token boundary is clean.
    tokenizer, ids = _handmade_byte_level([b"\xf0\x9f", b"\x98\x80\xf0\x9f", b"\x98\x80"])
    output_ids = [ids[b"x"], ids[b"\xf0\x9f"], *[ids[b"\x98\x80\xf0\x9f"]] * 100, ids[b"\x98\x80"]]
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = _stream(detok, output_ids, max_chunk=max_chunk)
    assert detok.output_text == tokenizer.decode(output_ids) == "x" + "😀" * 101
    assert not any("\ufffd" in d.text for d in deltas)
    assert all(len(d.text) == max_chunk for d in deltas[2:-1])  # each finished emoji shows at once
    assert len(detok._window._ids) <= 40  # bounded even without a clean boundary


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_leading_space_comes_from_prompt_context(name):
    tokenizer = TOKENIZERS[name]
    ids = _encode(tokenizer, "Hello world the end")
    # Split where a token starts with a space ("▁" in SentencePiece, "Ġ" in byte-level BPE).
    split = next(k for k, tok in enumerate(tokenizer.convert_ids_to_tokens(ids)) if k and tok[0] in "▁Ġ")
    prompt_ids, output_ids = ids[:split], ids[split:]
    expected = "Hello world the end"[len(tokenizer.decode(prompt_ids)) :]
    assert expected.startswith(" ")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert detok.add_tokens(output_ids[:1]).text.startswith(" ")
    _stream(detok, output_ids[1:])
    assert detok.output_text == expected
    without_context = IncrementalDetokenizer(tokenizer, []).add_tokens(output_ids[:1]).text
    assert without_context == tokenizer.decode(output_ids[:1])  # SentencePiece drops the space


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_window_stays_bounded(name):
    tokenizer, rng = TOKENIZERS[name], random.Random(3)
    decoded_lens: list[int] = []

    class _CountingBackend:
        def __init__(self, backend):
            self._backend = backend

        def decode(self, ids, skip_special_tokens):
            decoded_lens.append(len(ids))
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

        def get_added_tokens_decoder(self):
            return self._backend.get_added_tokens_decoder()

    class _Proxy:
        backend_tokenizer = _CountingBackend(tokenizer.backend_tokenizer)

    prompt_ids = _encode(tokenizer, "Once upon a time")
    output_ids = _encode(tokenizer, "".join(rng.choice(PIECES) for _ in range(1500)))
    detok = IncrementalDetokenizer(_Proxy(), prompt_ids)
    _stream(detok, output_ids)
    assert len(output_ids) > 1000
    assert max(decoded_lens) <= 12  # tokens per decode call, however long the output
    assert len(decoded_lens) <= 2 * len(output_ids) + 2
    assert detok.output_text == _expected_after_prompt(tokenizer, prompt_ids, output_ids)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_random_token_ids_never_crash(name):
    tokenizer, rng = TOKENIZERS[name], random.Random(4)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 60))]
        detok = IncrementalDetokenizer(tokenizer, [])
        deltas, tail = _stream(detok, ids, rng, 5)
        assert "".join(d.text for d in deltas) + tail == detok.output_text
        if name == "byte_level":  # byte fallback rewrites a whole invalid byte run; byte-level does not
            assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_skip_special_tokens(name, skip):
    tokenizer, rng = TOKENIZERS[name], random.Random(5)
    special_ids = [
        i for i, tok in tokenizer.backend_tokenizer.get_added_tokens_decoder().items() if tok.special
    ]
    for _ in range(100):
        prompt_ids = [rng.choice(special_ids)] + _encode(tokenizer, _random_text(rng, 5))
        output_ids = []  # special tokens between characters (inside one, byte fallback gives garbage)
        for _ in range(rng.randint(0, 20)):
            output_ids += _encode(tokenizer, rng.choice(PIECES))
            if rng.random() < 0.2:
                output_ids.append(rng.choice(special_ids))
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
        _stream(detok, output_ids, rng, 3)
        assert detok.output_text == _expected_after_prompt(tokenizer, prompt_ids, output_ids, skip)
        if name == "byte_level":
            assert detok.output_text == tokenizer.decode(output_ids, skip_special_tokens=skip)


# ---------------------------------------------------------------- stop strings


def _reference_cut(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Cut as if the text came one character at a time: the stop string completing first wins."""
    for end in range(1, len(text) + 1):
        found = [s for s in stop if s and end >= len(s) and text.startswith(s, end - len(s), end)]
        if found:
            stop_str = max(found, key=len)
            return text[: end if include else end - len(stop_str)], stop_str
    return text, None


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_stop_strings_random(name, include):
    tokenizer, rng = TOKENIZERS[name], random.Random(6)
    for _ in range(200):
        output_ids = _encode(tokenizer, _random_text(rng, 30))
        text = tokenizer.decode(output_ids, skip_special_tokens=True)
        stop = []
        for _ in range(rng.randint(1, 3)):
            source = text if text and rng.random() < 0.8 else _random_text(rng, 3) or "zz"
            start = rng.randrange(max(1, len(source)))
            stop.append(source[start : start + rng.randint(1, 6)] or "zz")
        detok = IncrementalDetokenizer(tokenizer, [], stop=stop, include_stop_str_in_output=include)
        deltas, _ = _stream(detok, output_ids, rng, 3)
        expected_text, expected_stop = _reference_cut(text, stop, include)
        assert detok.output_text == expected_text
        assert detok.is_stopped == (expected_stop is not None)
        assert [d.stop_str for d in deltas if d.stop_str] == ([expected_stop] if expected_stop else [])
        if expected_stop is None:
            continue
        if include:
            assert detok.output_text.endswith(expected_stop)
        else:
            assert not any(s in d.text for s in stop for d in deltas)
            assert not any(s in detok.output_text for s in stop)


def test_stop_text_is_held_back_while_it_could_still_match():
    tokenizer, rng = TOKENIZERS["byte_level"], random.Random(7)
    stop = ["the end", "日本語!", "😀😀", "ab", "a b c"]
    for _ in range(100):
        output_ids = _encode(tokenizer, _random_text(rng, 30))
        detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
        for k in range(len(output_ids)):
            if detok.add_tokens(output_ids[k : k + 1]).stop_str:
                break
            seen = tokenizer.decode(output_ids[: k + 1]).rstrip("\ufffd")
            shown_len = len(detok.output_text)
            assert seen.startswith(detok.output_text)
            # No stop string can start in the shown text; everything after it could start one.
            assert not any(s.startswith(seen[p:]) or s in seen[p:] for s in stop for p in range(shown_len))
            assert len(seen) - shown_len <= max(map(len, stop)) - 1
            if len(seen) > shown_len and not tokenizer.decode(output_ids[: k + 1]).endswith("\ufffd"):
                assert any(s.startswith(seen[shown_len:]) for s in stop)


def test_stop_string_split_across_tokens():
    tokenizer = TOKENIZERS["byte_level"]
    ids = _encode(tokenizer, "The quick brown fox jumps over the lazy dog.")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["quick brown fox"])
    deltas = [detok.add_tokens([i]) for i in ids]
    stop_at = [k for k, d in enumerate(deltas) if d.stop_str]
    assert len(stop_at) == 1 and stop_at[0] >= 2  # the stop string needed several tokens
    assert detok.output_text == "The " and deltas[stop_at[0]].stop_str == "quick brown fox"
    assert all(d == DetokenizerDelta("", None) for d in deltas[stop_at[0] + 1 :])
    assert detok.flush() == "" and detok.output_text == "The "


def test_stop_string_in_the_middle_of_a_token():
    tokenizer = TOKENIZERS["byte_level"]
    text = "Hello world, this is a small corpus"
    ids = _encode(tokenizer, text)
    token_text = next(t for t in map(tokenizer.decode, ([i] for i in ids)) if len(t.strip()) >= 4)
    stop = token_text.strip()[1:3]  # strictly inside the token's text
    for include in (False, True):
        detok = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
        _stream(detok, ids)
        expected, _ = _reference_cut(text, [stop], include)
        assert text.index(stop) > 0 and detok.stop_str == stop
        assert detok.output_text == expected == text[: text.index(stop) + (len(stop) if include else 0)]


def test_stop_at_the_very_first_token():
    tokenizer = TOKENIZERS["byte_level"]
    ids = _encode(tokenizer, "Hello world")
    first = tokenizer.decode(ids[:1])
    detok = IncrementalDetokenizer(tokenizer, _encode(tokenizer, "Say:"), stop=[first])
    assert detok.add_tokens(ids[:1]) == DetokenizerDelta("", first)
    assert detok.is_stopped and detok.output_text == ""
    assert detok.add_tokens(ids[1:]) == DetokenizerDelta("", None)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[first], include_stop_str_in_output=True)
    assert detok.add_tokens(ids[:1]) == DetokenizerDelta(first, first)


@pytest.mark.parametrize("max_chunk", [1, 100])
def test_overlapping_stop_strings(max_chunk):
    tokenizer = TOKENIZERS["metaspace"]
    cases = [  # (text, stop, output, matched)
        ("xabcx", ["bc", "ab"], "x", "ab"),
        ("xabcx", ["ab", "bc"], "x", "ab"),
        ("abcde", ["abcd", "bc"], "a", "bc"),  # "bc" completes before "abcd" could
        ("aaab", ["aab", "ab"], "a", "aab"),  # same end: the longer one
        ("the the end", ["the end", "end"], "the ", "the end"),
    ]
    for text, stop, output, matched in cases:
        ids = _encode(tokenizer, text)
        detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
        deltas, _ = _stream(detok, ids, max_chunk=max_chunk)
        assert (detok.output_text, detok.stop_str) == (output, matched), text
        assert [d.stop_str for d in deltas if d.stop_str] == [matched]


def test_include_stop_str_in_output_drops_the_rest():
    tokenizer = TOKENIZERS["byte_level"]
    ids = _encode(tokenizer, "Hello world, this is a small corpus")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["this", "corpus"], include_stop_str_in_output=True)
    deltas, tail = _stream(detok, ids)
    assert detok.output_text == "Hello world, this" and tail == ""
    assert [d.stop_str for d in deltas][-1] == "this"


def test_flush_releases_a_held_stop_prefix():
    tokenizer = TOKENIZERS["byte_level"]
    ids = _encode(tokenizer, "Hello wor")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world!"])
    shown = "".join(detok.add_tokens([i]).text for i in ids)
    assert shown == "Hello " and detok.output_text == "Hello "
    assert detok.flush() == "wor" and detok.output_text == "Hello wor" and not detok.is_stopped


def test_stop_string_found_in_text_released_by_flush():
    tokenizer, ids = _handmade_byte_level([b"ab\xf0"])
    detok = IncrementalDetokenizer(tokenizer, [], stop=["b\ufffd"])
    assert detok.add_tokens([ids[b"ab\xf0"]]) == DetokenizerDelta("a", None)  # "b" could start the stop
    assert detok.flush() == ""  # the unfinished character shows as U+FFFD and completes the stop
    assert detok.is_stopped and detok.stop_str == "b\ufffd" and detok.output_text == "a"


def test_empty_stop_strings_are_ignored():
    tokenizer = TOKENIZERS["byte_level"]
    ids = _encode(tokenizer, "Hello world")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["", "world"])
    _stream(detok, ids)
    assert detok.output_text == "Hello " and detok.stop_str == "world"
