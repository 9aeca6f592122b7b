"""POST /generate: the native endpoint, shaped like SGLang's.

Input: `text` (a string or a list) or `input_ids` (a list or a list of lists), `sampling_params`
with SGLang's names (max_new_tokens, min_new_tokens, no_stop_trim, sampling_seed, ...), `stream`,
`return_logprob` and `top_logprobs_num` (`regex`, `json_schema` or `ebnf` in sampling_params constrain
the output). Output: `{"text", "output_ids", "meta_info"}` for one prompt
and n == 1, else a list of them (each with "index"). Streaming sends the same object with the text
so far (cumulative, as SGLang does) after each step, then `data: [DONE]`. No torch here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kestrel.server.client import RequestGroup
from kestrel.server.errors import APIError
from kestrel.server.protocol import GenerateRequest
from kestrel.server.serving import (Choice, ClientGone, ServerState, SSEResponse, arrival_time, check_token_ids,
                                    client_gone_response, collect, encode_text, make_sampling_params, parse_body,
                                    sse, submit, until_disconnect, wait_accepted)
from kestrel.server.structured import generate_constraint

_RENAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens",
            "include_stop_str_in_output": "no_stop_trim", "seed": "sampling_seed"}


async def generate(state: ServerState, request: Request) -> Response:
    req = await parse_body(state, request, GenerateRequest)
    state.check_ready()
    prompts, is_batch, prompt_param = await state.run_blocking(_prompts, state, req)
    sp = req.sampling_params
    renames = {name: f"sampling_params.{_RENAMES.get(name, name)}" for name in
               ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
                "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")}
    renames["logprobs"] = "top_logprobs_num"
    given = dict(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
                 presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
                 repetition_penalty=sp.repetition_penalty,
                 seed=sp.sampling_seed if sp.sampling_seed is not None else sp.seed,
                 min_tokens=sp.min_new_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
                 ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens,
                 include_stop_str_in_output=sp.no_stop_trim,
                 logprobs=(req.top_logprobs_num or 0) if req.return_logprob else None)
    kwargs = {k: v for k, v in given.items() if v is not None}
    constraint = generate_constraint(sp)
    params = make_sampling_params(state, [len(p) for p in prompts], sp.max_new_tokens, renames, prompt_param,
                                  structured_outputs=constraint, **kwargs)
    request_id = req.rid or uuid.uuid4().hex
    # A caller's rid may repeat one the engine still holds (in flight, or stopped by a stop string whose
    # abort is still on its way), so the engine gets it with a unique suffix; the reply shows the rid.
    engine_id = f"{req.rid}#{uuid.uuid4().hex[:12]}" if req.rid else request_id
    group = await submit(state, engine_id, prompts, params, arrival_time(request))
    num_choices = len(prompts) * params.n
    prompt_lens = [len(prompts[i // params.n]) for i in range(num_choices)]
    as_list = is_batch or num_choices > 1
    if req.stream:
        if constraint is not None:
            await wait_accepted(group)
        return SSEResponse(_stream(request_id, group, prompt_lens, bool(req.return_logprob), as_list), group)
    try:
        choices = await until_disconnect(request, collect(group, num_choices))
    except ClientGone:
        return client_gone_response()
    results = [_result(request_id, i, c, prompt_lens[i], bool(req.return_logprob), as_list)
               for i, c in enumerate(choices)]
    return JSONResponse(results if as_list else results[0])


def _prompts(state: ServerState, req: GenerateRequest) -> tuple[list[list[int]], bool, str]:
    """(token ids per prompt, whether the input was a batch, the parameter holding the prompt)."""
    if (req.text is None) == (req.input_ids is None):
        raise APIError("give exactly one of 'text' or 'input_ids'", param="text")
    if req.text is not None:
        texts = [req.text] if isinstance(req.text, str) else req.text
        if not texts:
            raise APIError("'text' must not be an empty list", param="text")
        return [encode_text(state, t, "text") for t in texts], isinstance(req.text, list), "text"
    ids = req.input_ids
    if not ids:
        raise APIError("'input_ids' is empty: give at least one token", param="input_ids")
    batch = [ids] if isinstance(ids[0], int) else ids
    for prompt in batch:
        check_token_ids(state, prompt, "input_ids")
    return [list(p) for p in batch], batch is ids, "input_ids"


def _result(request_id: str, index: int, choice: Choice, prompt_len: int, want_logprobs: bool,
            with_index: bool) -> dict:
    meta: dict = {"id": f"{request_id}-{index}", "prompt_tokens": prompt_len,
                  "completion_tokens": len(choice.token_ids), "cached_tokens": choice.num_cached_tokens,
                  "finish_reason": _finish(choice)}
    if want_logprobs:
        meta["output_token_logprobs"] = [[p.chosen.logprob, p.chosen.token_id, p.chosen.token]
                                         for p in choice.logprobs]
        meta["output_top_logprobs"] = [[[t.logprob, t.token_id, t.token] for t in p.top] for p in choice.logprobs]
    out: dict = {"text": choice.text, "output_ids": list(choice.token_ids), "meta_info": meta}
    if with_index:
        out["index"] = index
    return out


def _finish(choice: Choice) -> dict | None:
    if choice.finish_reason is None:
        return None
    if choice.finish_reason == "length":
        return {"type": "length", "length": len(choice.token_ids)}
    return {"type": choice.finish_reason, "matched": choice.stop_reason}


async def _stream(request_id: str, group: RequestGroup, prompt_lens: list[int], want_logprobs: bool,
                  with_index: bool) -> AsyncIterator[str]:
    choices = [Choice() for _ in prompt_lens]
    async for index, delta in group:
        choice = choices[index]
        choice.add(delta)
        yield sse(_result(request_id, index, choice, prompt_lens[index], want_logprobs, with_index))
