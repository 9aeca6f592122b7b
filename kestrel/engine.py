"""The engine: requests in, one step at a time, token deltas out.

    step() = schedule -> build the step batch -> commit -> execute on the worker(s) -> update requests -> emit

With async scheduling (default on CUDA) a step submits its batch and then applies the previous
step's result, so the host builds step N+1 while the device runs step N; tokens still in flight
enter the next batch as placeholders the worker fills in on the device.

The engine side owns requests and their bookkeeping (scheduler, KV manager, stop rules, prompt
checks); the worker side owns the device (model, KV pool, slot table, attention, sampler) and is
reached only through an executor, with a `StepBatch` of plain data. The same `Engine` runs
in-process under the offline `LLM` API and in the server's engine process. It works on token ids
only: tokenizing, detokenizing and stop strings belong to the frontend, which calls
`abort_request` when it finds a stop string. After each step, `last_step` (a `StepInfo`) says
what it ran: batch size, prompt and generated tokens, queue times, prefix-cache lookups.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kestrel.config import EngineConfig, ModelConfig
from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.prefix_cache import NoPrefixCache
from kestrel.kvcache.radix_cache import RadixCache
from kestrel.limits import PromptLimits
from kestrel.model_files import resolve_model_path
from kestrel.models.loader import load_model_config
from kestrel.outputs import EMPTY_STEP, EngineOutput, StepInfo
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler, SchedulerOutput, build_step_batch
from kestrel.step_batch import StepBatch
from kestrel.stop_rules import StopRules
from kestrel.structured import StructuredOutputManager
from kestrel.worker.executor import PendingResult, create_executor


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Callable[[], object] | None = None) -> None:
        """`tokenizer` returns the model's tokenizer, which structured outputs need (called when first needed)."""
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config: ModelConfig = load_model_config(self.model_path)
        self.executor = create_executor(config, self.model_path, self.model_config)
        info = self.executor.info
        self.max_model_len = info.max_model_len
        self.dtype = info.dtype
        self.limits = PromptLimits(self.max_model_len, self.model_config.vocab_size)
        self.stop_rules = StopRules(self.model_config.eos_token_ids, self.max_model_len)
        self.structured = StructuredOutputManager(
            tokenizer or _no_tokenizer, self.model_config.vocab_size,
            self.model_config.eos_token_ids, config.jump_forward, config.grammar_cache_size)
        self.kv_manager = KVCacheManager(info.num_kv_slots, config.max_num_seqs, self.max_model_len,
                                         RadixCache if config.enable_prefix_caching else NoPrefixCache)
        self.scheduler = Scheduler(self.kv_manager, self.stop_rules, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.schedule_policy, self.structured)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else info.device.startswith("cuda"))
        self._inflight: tuple[SchedulerOutput, PendingResult] | None = None
        """The submitted step whose result is not applied yet (async scheduling)."""
        self._num_arrivals = 0
        self._arrival_times: dict[str, float] = {}
        """Requests not scheduled yet -> when they were added (time.monotonic())."""
        self.last_step: StepInfo = EMPTY_STEP

    # ---- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError if it can never run (empty, too long, bad ids, id in use)."""
        self.limits.check(prompt_token_ids)
        self.scheduler.add(Request.new(request_id, prompt_token_ids, params, self._num_arrivals))
        self._num_arrivals += 1
        self._arrival_times[request_id] = time.monotonic()

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV slots; unknown or finished ids are ignored."""
        self.scheduler.abort(request_id)
        self._arrival_times.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    @property
    def num_running_requests(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting_requests(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV slots not free (held by requests or the prefix cache)."""
        kv = self.kv_manager
        return 1.0 - kv.num_free_slots / kv.num_slots

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        self.last_step = EMPTY_STEP
        if not self.async_scheduling:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            batch = self._commit(sched)
            return self.scheduler.update(sched, self.executor.execute(batch))
        outputs = []
        if self._inflight is not None and self.scheduler.needs_token_history():
            outputs += self._apply_inflight()  # penalties read every token: this step waits for the last
        sched = self.scheduler.schedule()
        pending = None if sched.is_empty else self.executor.submit(self._commit(sched))
        if self._inflight is not None:
            outputs += self._apply_inflight()
        self._inflight = None if pending is None else (sched, pending)
        return outputs

    def _commit(self, sched: SchedulerOutput) -> StepBatch:
        self.last_step = self._step_info(sched)
        batch = build_step_batch(sched, self.kv_manager, self.stop_rules, self.scheduler.take_finished_ids(),
                                 self.structured)
        self.scheduler.commit(sched)
        return batch

    def _apply_inflight(self) -> list[EngineOutput]:
        sched, pending = self._inflight
        self._inflight = None
        return self.scheduler.update(sched, pending.result())

    def _step_info(self, sched: SchedulerOutput) -> StepInfo:
        """Figures of a scheduled step, read before `commit` advances its requests."""
        now = time.monotonic()
        num_decodes, queue_times, queried, hits = 0, [], 0, 0
        for req, _ in sched.scheduled:
            if req.num_computed_tokens >= req.num_prompt_tokens:
                num_decodes += 1
            arrival = self._arrival_times.pop(req.request_id, None)
            if arrival is not None:
                queue_times.append(now - arrival)
                queried += req.num_prompt_tokens
                hits += req.num_computed_tokens
        num_tokens = sched.num_batched_tokens
        return StepInfo(len(sched.scheduled), num_tokens, num_tokens - num_decodes, len(sched.sampled),
                        queue_times, queried, hits)
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's name); False, doing nothing, while requests run."""
        return not self.has_unfinished_requests() and self.kv_manager.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Assert KV bookkeeping is consistent (free + cached + in use == total)."""
        self.kv_manager.check_integrity()

    def shutdown(self) -> None:
        """Stop the worker(s); the engine is unusable afterwards."""
        self.executor.shutdown()


def _no_tokenizer():
    raise ValueError("structured outputs need the model's tokenizer: build the Engine with tokenizer=...")
