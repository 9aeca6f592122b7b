"""The engine: requests in, one step at a time, token deltas out.

    step() = schedule -> run model -> sample -> update requests -> emit

The same `Engine` runs in-process under the offline `LLM` API and, later, in
the server's engine process. It works on token ids only: tokenizing,
detokenizing and stop strings belong to the frontend, which calls
`abort_request` when it finds a stop string.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from kestrel.config import EngineConfig, ModelConfig
from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.pool import KVPool
from kestrel.model_files import resolve_model_path
from kestrel.kernels.cpu_linear import cpu_has_native_bf16
from kestrel.kernels.cpu_malloc import keep_freed_memory
from kestrel.models.loader import build_model, load_model_config, pack_weights
from kestrel.outputs import EngineOutput
from kestrel.request import FinishReason, Request
from kestrel.runner.model_runner import ModelRunner, SampledToken
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.device == "cpu":
            keep_freed_memory()
        self.model_path = resolve_model_path(config.model)
        self.model_config: ModelConfig = load_model_config(self.model_path)
        self.device = torch.device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.model_config, self.device)
        if config.dtype == "auto" and self.dtype == torch.float32 and cpu_has_native_bf16():
            logger.info("This CPU has bf16 instructions: --dtype bfloat16 runs ~1.6x faster "
                        "(results then depend slightly on batch composition).")
        sizes = _resolve_sizes(config, self.model_config, self.dtype)
        self.max_model_len, num_slots = sizes
        model = build_model(self.model_path, self.model_config, self.dtype, self.device,
                            max_position=self.max_model_len, load_format=config.load_format,
                            show_progress=config.show_progress)
        if config.prepack_weights and (packed := pack_weights(model)):
            logger.info("%d linear layers run on oneDNN-packed weights (%s)", packed, self.dtype)
        mc = self.model_config
        self.pool = KVPool(mc.num_layers, num_slots, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        self.kv = KVCacheManager(num_slots, config.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool, self.kv, self.device, seed=config.seed)
        self._requests: dict[str, Request] = {}
        self._num_arrivals = 0

    # ---- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError if it can never run (empty, too long, bad ids)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        req = Request.new(request_id, prompt_token_ids, params, self._num_arrivals)
        self._num_arrivals += 1
        self._requests[request_id] = req
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV slots; unknown or finished ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, FinishReason.ABORT)
            self.runner.release(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched)
        return self._update(sched, sampled)

    def check_integrity(self) -> None:
        """Assert KV bookkeeping is consistent (free + in use == total)."""
        self.kv.check_integrity()

    # ---- helpers -------------------------------------------------------------
    def _update(self, sched: SchedulerOutput, sampled: list[SampledToken]) -> list[EngineOutput]:
        for req, n in sched.scheduled:
            req.num_computed_tokens += n
        outputs = []
        for req, token_id, logprobs in sampled:
            req.token_ids.append(token_id)
            if logprobs is not None:
                req.logprobs.append(logprobs)
            reason = self._finish_reason(req, token_id)
            if reason is not None:
                self.scheduler.finish(req, reason)
                self.runner.release(req.request_id)
                del self._requests[req.request_id]
            outputs.append(EngineOutput(
                req.request_id, [token_id], None if logprobs is None else [logprobs],
                None if reason is None else reason.value, req.stop_token_id))
        return outputs

    def _finish_reason(self, req: Request, token_id: int) -> FinishReason | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if (not p.ignore_eos and token_id in self.model_config.eos_token_ids) or token_id in p.stop_token_ids:
                req.stop_token_id = token_id
                return FinishReason.STOP
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the context length (max_model_len) is "
                             f"{self.max_model_len}; it must leave room for at least one generated token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is out of range [0, {vocab})")


def _resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if cfg.torch_dtype in ("float32", "float") else getattr(torch, cfg.torch_dtype)
    return getattr(torch, name)


class _Sizes(NamedTuple):
    max_model_len: int
    num_slots: int


def _resolve_sizes(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype) -> _Sizes:
    if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} is larger than the model's context "
                         f"length {cfg.max_position_embeddings}")
    max_len = config.max_model_len or cfg.max_position_embeddings
    num_slots = config.num_kv_slots
    if num_slots is None:
        per_slot = KVPool.bytes_per_slot(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        num_slots = int(config.kv_cache_memory_gb * 2**30) // per_slot
    if num_slots < max_len:
        logger.warning("KV pool holds %d tokens, fewer than max_model_len %d: capping max_model_len",
                       num_slots, max_len)
        max_len = num_slots
    return _Sizes(max_len, num_slots)
