"""`kestrel chat`: the session streams text, keeps history, /clear and /exit work, long history is cut."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kestrel.chat import ChatSession
from kestrel.cli import build_parser
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams
from tests.conftest import make_tiny_hf_model

_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def session_parts(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there, how are you today? user assistant system"] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    tokenizer.chat_template = _TEMPLATE
    path = str(tmp_path_factory.mktemp("tiny_chat"))
    make_tiny_hf_model(path, "llama", vocab_size=tokenizer.vocab_size, max_position_embeddings=96)
    engine = Engine(EngineConfig(model=path, show_progress=False, max_model_len=96))
    return engine, tokenizer


def _session(parts, **kw) -> ChatSession:
    engine, tokenizer = parts
    params = SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 6), ignore_eos=True)
    return ChatSession(engine, tokenizer, params, **kw)


def test_reply_streams_and_keeps_history(session_parts):
    session = _session(session_parts, system="be nice")
    pieces: list[str] = []
    answer = session.reply("hello there", pieces.append)
    assert "".join(pieces) == answer
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    session.reply("how are you", pieces.append)
    assert len(session.history) == 4
    session.clear()
    assert session.history == []
    engine = session_parts[0]
    assert not engine.has_unfinished_requests() and engine.kv_manager.num_available_slots == engine.kv_manager.num_slots


def test_repl_commands(session_parts):
    session = _session(session_parts)
    lines = iter(["hello", "/clear", "", "/help", "how are you", "/exit", "never read"])
    written: list[str] = []
    session.repl(read=lambda _prompt: next(lines), write=written.append)
    out = "".join(written)
    assert "conversation cleared" in out and "/exit" in out
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[0]["content"] == "how are you"
    assert next(lines) == "never read"


def test_repl_ends_on_end_of_input(session_parts):
    session = _session(session_parts)

    def read(_prompt: str) -> str:
        raise EOFError

    session.repl(read=read, write=lambda _text: None)


def test_long_history_drops_oldest_turns(session_parts):
    session = _session(session_parts, max_tokens=20)
    for _ in range(6):
        session.reply("hello there, how are you today?", lambda _text: None)
    engine = session_parts[0]
    assert 2 <= len(session.history) < 12  # oldest turns were dropped to fit 96 tokens
    assert engine.kv_manager.num_available_slots == engine.kv_manager.num_slots


def test_chat_command_is_registered():
    args = build_parser().parse_args(["chat", "--max-tokens", "5", "--system", "hi"])
    assert args.max_tokens == 5 and args.system == "hi" and callable(args.func)
