"""The offline Python API, shaped like vLLM's so a vLLM script runs by changing the import:

    from kestrel import LLM, SamplingParams
    llm = LLM()                      # the bundled SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)

Runs the `Engine` in-process; tokenizing, detokenizing and stop strings happen
here (the frontend's job), and a stop string aborts its request in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Union

from tqdm import tqdm

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.frontend.output_processor import OutputProcessor, logprob_dicts
from kestrel.frontend.tokenizer import apply_chat_template, load_tokenizer
from kestrel.outputs import CompletionOutput, EngineOutput, RequestOutput
from kestrel.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = Union[str, dict]
_VLLM_ONLY_ARGS = {"gpu_memory_utilization", "enforce_eager", "trust_remote_code", "swap_space",
                   "disable_log_stats", "quantization", "revision"}


@dataclass(slots=True)
class _Completion:
    """One engine request: one of the n completions of a prompt, and the output it fills."""

    output: RequestOutput
    completion: CompletionOutput


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, **kwargs) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size must be 1 for now (tensor parallelism is not built yet)")
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names - _VLLM_ONLY_ARGS
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        for k in set(kwargs) & _VLLM_ONLY_ARGS:
            logger.info("LLM(): ignoring vLLM option %s=%r", k, kwargs.pop(k))
        self.config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, **kwargs)
        self.engine = Engine(self.config, tokenizer=lambda: self.tokenizer)
        self.tokenizer = load_tokenizer(tokenizer or self.engine.model_path)
        self._outputs = OutputProcessor(self.tokenizer)
        self._next_id = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from a resolved EngineConfig (used by the CLI)."""
        values = {f.name: getattr(config, f.name) for f in fields(EngineConfig)}
        return cls(**values)

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (as vLLM's `LLM.reset_prefix_cache`)."""
        return self.engine.reset_prefix_cache()

    # ---- public API ----------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a string or {"prompt_token_ids": [...]}); outputs keep the input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        encoded = []
        for conv in conversations:
            if not conv:
                raise ValueError("each conversation must have at least one message")
            ids = apply_chat_template(self.tokenizer, conv, add_generation_prompt, **(chat_template_kwargs or {}))
            encoded.append((self.tokenizer.decode(ids), ids))
        return self._run(encoded, sampling_params, use_tqdm)

    # ---- the loop ------------------------------------------------------------
    def _run(self, encoded: list[tuple[str | None, list[int]]], sampling_params, use_tqdm: bool):
        params_list = self._params_per_prompt(sampling_params, len(encoded))
        outputs: list[RequestOutput] = []
        pending: dict[str, _Completion] = {}
        try:
            for (text, ids), params in zip(encoded, params_list):
                outputs.append(self._add(text, ids, params, pending))
            bar = tqdm(total=len(outputs), desc="Generating", unit=" prompts", disable=not use_tqdm)
            with bar:
                while self.engine.has_unfinished_requests():
                    for eo in self.engine.step():
                        if self._on_output(eo, pending) and pending[eo.request_id].output.finished:
                            bar.update(1)
        finally:
            for rid in pending:
                self.engine.abort_request(rid)  # no-op for finished ones; cleans up on errors
                self._outputs.remove(rid)
        return outputs

    def _add(self, text, ids, params: SamplingParams, pending: dict[str, _Completion]) -> RequestOutput:
        base_id = str(self._next_id)
        self._next_id += 1
        out = RequestOutput(base_id, text, ids)
        for i in range(params.n):
            child = params.for_completion(i)
            rid = base_id if params.n == 1 else f"{base_id}-{i}"
            self.engine.add_request(rid, ids, child)
            self._outputs.add_request(rid, ids, child)
            comp = CompletionOutput(i, "", [], None, [] if params.logprobs is not None else None)
            out.outputs.append(comp)
            pending[rid] = _Completion(out, comp)
        return out

    def _on_output(self, eo: EngineOutput, pending: dict[str, _Completion]) -> bool:
        """Apply one engine delta; True when this completion just finished."""
        delta = self._outputs.process(eo)
        if delta is None:
            return False
        p = pending[eo.request_id]
        comp = p.completion
        cached = p.output.num_cached_tokens
        p.output.num_cached_tokens = eo.num_cached_tokens if cached is None else min(cached, eo.num_cached_tokens)
        if self._outputs.needs_abort(eo, delta):
            self.engine.abort_request(eo.request_id)
        comp.token_ids.extend(delta.token_ids)
        if delta.logprobs and comp.logprobs is not None:
            comp.logprobs.extend(logprob_dicts(delta.logprobs))
        comp.text += delta.text
        if delta.finish_reason is None:
            return False
        comp.finish_reason, comp.stop_reason = delta.finish_reason, delta.stop_reason
        if comp.logprobs:
            comp.cumulative_logprob = sum(lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids))
        p.output.finished = all(c.finish_reason is not None for c in p.output.outputs)
        return True

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r}")

    @staticmethod
    def _params_per_prompt(sp, num_prompts: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sp, SamplingParams):
            return [sp] * num_prompts
        sp = list(sp)
        if len(sp) != num_prompts:
            raise ValueError(f"got {len(sp)} sampling_params for {num_prompts} prompts; give one or one per prompt")
        return sp
