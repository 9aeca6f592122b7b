"""Engine outputs -> what a client may see now: the one owner of turning token deltas into text.

For each live request it holds an `IncrementalDetokenizer` (UTF-8 safe, stop strings) and turns each
`EngineOutput` into a `TextDelta`: the new visible text, the new token ids, their logprobs with
decoded tokens, and the finish reason. A stop string ends the request here, before the engine
knows: `needs_abort(out, delta)` tells the caller to abort it in the engine. Shared by the offline
`LLM`, the terminal chat and the server's detokenizer process. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kestrel.frontend.detokenizer import IncrementalDetokenizer
from kestrel.messages import PositionLogprobs, TextDelta, TopLogprob
from kestrel.outputs import EngineOutput, Logprob, TokenLogprobs
from kestrel.sampling_params import SamplingParams


@dataclass(slots=True)
class _Live:
    """One request being detokenized."""

    detok: IncrementalDetokenizer
    num_logprobs: int | None
    """Top alternatives per position the request asked for; None: no logprobs."""


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._live: dict[str, _Live] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode_one = ((lambda t: backend.decode([t], skip_special_tokens=False)) if backend is not None
                            else (lambda t: tokenizer.decode([t], skip_special_tokens=False)))

    @property
    def num_live(self) -> int:
        return len(self._live)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(self._tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        self._live[request_id] = _Live(detok, params.logprobs)

    def remove(self, request_id: str) -> None:
        """Forget a request (aborted or failed); unknown ids are ignored."""
        self._live.pop(request_id, None)

    def output_text(self, request_id: str) -> str:
        return self._live[request_id].detok.output_text

    def process(self, out: EngineOutput) -> TextDelta | None:
        """The text delta of one engine output; None for a request it does not hold (aborted, stopped).

        The request is forgotten once its delta carries a finish reason.
        """
        live = self._live.get(out.request_id)
        if live is None:
            return None
        delta = live.detok.add_tokens(out.new_token_ids)
        text, finish_reason, stop_reason = delta.text, None, None
        if delta.stop_str is not None:
            finish_reason, stop_reason = "stop", delta.stop_str
        elif out.finish_reason is not None:
            text += live.detok.flush()
            finish_reason = "stop" if live.detok.is_stopped else out.finish_reason
            stop_reason = live.detok.stop_str if live.detok.is_stopped else out.stop_token_id
        if finish_reason is not None:
            del self._live[out.request_id]
        logprobs = None
        if live.num_logprobs is not None and out.new_logprobs:
            logprobs = [self._position(record, token_id, live.num_logprobs)
                        for record, token_id in zip(out.new_logprobs, out.new_token_ids)]
        return TextDelta(out.request_id, text, list(out.new_token_ids), logprobs, finish_reason, stop_reason,
                         out.num_cached_tokens)

    @staticmethod
    def needs_abort(out: EngineOutput, delta: TextDelta | None) -> bool:
        """The frontend finished a request the engine still runs (a stop string matched)."""
        return delta is not None and delta.finish_reason is not None and out.finish_reason is None

    def _position(self, record: TokenLogprobs, chosen_id: int, num_top: int) -> PositionLogprobs:
        chosen = record.get(chosen_id)
        chosen_lp, chosen_rank = (chosen.logprob, chosen.rank) if chosen is not None else (float("-inf"), 0)
        ranked = sorted((lp.rank, token_id, lp.logprob) for token_id, lp in record.items())
        top = [TopLogprob(token_id, self._decode_one(token_id), logprob, rank)
               for rank, token_id, logprob in ranked if rank <= num_top][:num_top]
        return PositionLogprobs(TopLogprob(chosen_id, self._decode_one(chosen_id), chosen_lp, chosen_rank), top)


def logprob_dicts(positions: list[PositionLogprobs]) -> list[TokenLogprobs]:
    """vLLM's shape of logprobs (one {token id: Logprob} per position, chosen token first) from text deltas."""
    records = []
    for p in positions:
        record = {p.chosen.token_id: Logprob(p.chosen.logprob, p.chosen.rank, p.chosen.token)}
        for t in p.top:
            record.setdefault(t.token_id, Logprob(t.logprob, t.rank, t.token))
        records.append(record)
    return records
