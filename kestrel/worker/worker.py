"""A worker: one device's share of a step. `StepBatch` in, sampled tokens out.

Owns the model, the KV pool, the device-side slot table, the attention backend and the sampler,
plus per-request device state (seeded generators) until the engine says a request ended. It knows
nothing of requests, queues or stop rules (an import-linter contract keeps the scheduler and
`Request` out): everything it needs for a step is in the batch, so a tensor-parallel rank in
another process runs the same `execute` on the same batch.

    execute(batch) = stage inputs -> update slot table -> attention metadata -> forward
                     -> logits of the sampled rows -> sample

A decode step on a GPU replays a CUDA graph instead of the eager forward (`cuda_graphs.py`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from kestrel.attention import AttentionContext, BatchLayout, create_backend
from kestrel.config import EngineConfig, ModelConfig
from kestrel.kernels.cpu_linear import cpu_has_native_bf16
from kestrel.kernels.cpu_malloc import keep_freed_memory
from kestrel.kvcache.pool import KVPool
from kestrel.models.common import DecoderModel
from kestrel.models.loader import build_model, pack_weights, prepare_quantized
from kestrel.step_batch import SampleRow, StepBatch, StepResult
from kestrel.worker.inputs import InputStager
from kestrel.worker.piecewise_graphs import PiecewiseGraphRunner
from kestrel.worker.sampler import Sampler, SamplerOutput, SamplingRow
from kestrel.worker.compiled_decode import CompiledDecodeRunner
from kestrel.worker.compiled_prefill import CompiledPrefillRunner
from kestrel.worker.cuda_graphs import CudaGraphRunner
from kestrel.worker.sizing import (cap_max_model_len, resolve_backend, resolve_device, resolve_dtype,
                                   resolve_max_model_len, resolve_num_slots)
from kestrel.worker.slot_table import SlotTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the engine learns from its worker once the model is loaded."""

    max_model_len: int
    """Context length after capping at the KV pool size."""
    num_kv_slots: int
    dtype: str
    """Compute dtype name, e.g. "float32"."""
    device: str
    attention_backend: str


class Worker:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        mc = model_config
        self.dtype = resolve_dtype(config.dtype, mc, self.device)
        if config.dtype == "auto" and self.dtype == torch.float32 and cpu_has_native_bf16():
            logger.info("This CPU has bf16 instructions: --dtype bfloat16 runs ~1.6x faster "
                        "(results then depend slightly on batch composition).")
        max_model_len = resolve_max_model_len(config, mc)
        backend_name = resolve_backend(config.attention_backend, self.device)
        self.model = build_model(model_path, mc, self.dtype, self.device, max_position=max_model_len,
                                 load_format=config.load_format, show_progress=config.show_progress,
                                 use_triton=backend_name == "triton")
        if config.cpu_quantized_decode:
            self._prepare_quantized(model_path)
        if config.prepack_weights and (packed := pack_weights(self.model)):
            logger.info("%d linear layers run on oneDNN-packed weights (%s)", packed, self.dtype)
        self.backend = create_backend(backend_name, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                                      head_dim=mc.head_dim, max_model_len=max_model_len, device=self.device,
                                      max_num_seqs=config.max_num_seqs)
        num_slots = resolve_num_slots(config, mc, self.dtype, self.device,
                                      profile=lambda: self._profile_step(mc, max_model_len))
        max_model_len = cap_max_model_len(max_model_len, num_slots)
        self.pool = KVPool(mc.num_layers, num_slots, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        self.kv_caches = self.pool.layers()
        self.slot_table = SlotTable(config.max_num_seqs, max_model_len, self.device)
        self.sampler = Sampler(config.seed)
        self.inputs = InputStager(self.device)
        self._generators: dict[str, torch.Generator] = {}
        self._previous_tokens = torch.zeros(1, dtype=torch.int64, device=self.device)
        """[S] the last step's sampled tokens, on the device (placeholders of the next step point here)."""
        self.graphs: CudaGraphRunner | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CudaGraphRunner(self.model, self.backend, self.kv_caches, self.slot_table.table,
                                          config.max_num_seqs, self.device)
            self.graphs.capture()
        self.mixed_graphs: PiecewiseGraphRunner | None = None
        if self.graphs is not None and config.mixed_graph_max_tokens and isinstance(self.model.model, DecoderModel):
            self.mixed_graphs = PiecewiseGraphRunner(self.model, self.kv_caches, config.mixed_graph_max_tokens,
                                                     self.device)
            self.mixed_graphs.capture()
        self.compiled: CompiledDecodeRunner | None = None
        if self.device.type == "cpu" and config.compile_decode:
            self.compiled = CompiledDecodeRunner(self.model, self.kv_caches, config.max_num_seqs, self.device)
            self.compiled.warmup()
        self.compiled_prefill: CompiledPrefillRunner | None = None
        if self.device.type == "cpu" and config.compile_prefill and isinstance(self.model.model, DecoderModel):
            self.compiled_prefill = CompiledPrefillRunner(self.model, self.device)
            self.compiled_prefill.warmup()
        self.info = WorkerInfo(max_model_len, num_slots, str(self.dtype).removeprefix("torch."),
                               str(self.device), self.backend.name)

    def _prepare_quantized(self, model_path: str) -> None:
        if self.device.type != "cpu":
            raise ValueError(f"--cpu-quantized-decode runs on CPU only, but the device is {self.device}; "
                             "pass --device cpu or drop --cpu-quantized-decode")
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"--cpu-quantized-decode needs float32 or bfloat16 weights, got {self.dtype}")
        kinds = prepare_quantized(self.model, model_path, self.config.load_format)
        logger.info("Quantized weights for small matmuls: %d layers int4 (the checkpoint's Q4 codes), "
                    "%d int8 (rounded per row)", kinds["int4"], kinds["int8"])

    def execute(self, batch: StepBatch) -> StepResult:
        return self.submit(batch).result()

    @torch.inference_mode()
    def submit(self, batch: StepBatch) -> PendingStep:
        """Queue the step's device work; the tokens come with `.result()` (on a GPU, without waiting here)."""
        for request_id in batch.finished_request_ids:
            self._generators.pop(request_id, None)
        inputs = self.inputs.stage(batch)
        self.slot_table.write(inputs.write_rows, inputs.write_positions, inputs.write_slots)
        if not batch.num_tokens:
            return PendingStep(None)
        token_ids = inputs.token_ids  # [T]
        if batch.uses_previous_tokens:  # placeholders -(1 + i): the previous step's i-th sampled token
            previous = self._previous_tokens[(-token_ids - 1).clamp_(min=0)].to(torch.int32)
            token_ids = torch.where(token_ids < 0, previous, token_ids)
        layout = BatchLayout(batch.query_lens, batch.seq_lens, inputs.query_start_loc, inputs.seq_lens,
                             inputs.req_rows, self.slot_table.table, inputs.slot_mapping)
        if self.graphs is not None and self.graphs.can_run(layout) and len(batch.sample_rows) == batch.num_reqs:
            # A decode step: every request samples its one token, in order.
            logits = self.graphs.run(token_ids, inputs.positions, layout)  # [R, vocab]
        elif (self.compiled is not None and self.compiled.can_run(layout)
              and len(batch.sample_rows) == batch.num_reqs):
            logits = self.compiled.run(token_ids, inputs.positions, layout)  # [R, vocab]
        else:
            ctx = AttentionContext(self.backend, self.backend.prepare(layout), self.kv_caches)
            if self.mixed_graphs is not None and self.mixed_graphs.can_run(layout):
                hidden = self.mixed_graphs.run(token_ids, inputs.positions, ctx)  # [T, hidden]
            elif self.compiled_prefill is not None and self.compiled_prefill.can_run(layout):
                hidden = self.compiled_prefill.run(token_ids, inputs.positions, ctx)  # [T, hidden]
            else:
                hidden = self.model(token_ids, inputs.positions, ctx)  # [T, hidden]
            if not batch.sample_rows:
                return PendingStep(None)
            logits = self.model.compute_logits(hidden[inputs.sample_indices])  # [S, vocab]
        # Host work for the sampler while the device runs the forward pass.
        prepared = self.sampler.prepare([self._sampling_row(row) for row in batch.sample_rows], self.device)
        out = self.sampler.sample(logits, prepared, to_host=False)
        self._previous_tokens = out.token_ids
        return PendingStep(out)

    @torch.inference_mode()
    def _profile_step(self, mc: ModelConfig, max_model_len: int) -> None:
        """The largest step once, on scratch KV: max_num_batched_tokens of prefill (in requests of at most
        max_model_len - 1 tokens) and the logits of max_num_seqs rows."""
        cfg = self.config
        num_tokens = max(1, cfg.max_num_batched_tokens)
        chunk = max(1, min(num_tokens, max_model_len - 1))
        lens = [min(chunk, num_tokens - start) for start in range(0, num_tokens, chunk)]
        i32 = dict(dtype=torch.int32, device=self.device)
        pool = KVPool(mc.num_layers, num_tokens, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        table = torch.zeros(len(lens), max_model_len, **i32)
        positions = torch.cat([torch.arange(n, **i32) for n in lens])  # [T]
        for r, n in enumerate(lens):
            table[r, :n] = torch.arange(r * chunk, r * chunk + n, **i32)
        starts = [0, *itertools.accumulate(lens)]
        layout = BatchLayout(lens, lens, torch.tensor(starts, **i32), torch.tensor(lens, **i32),
                             torch.arange(len(lens), **i32), table, torch.arange(num_tokens, **i32))
        ctx = AttentionContext(self.backend, self.backend.prepare(layout), pool.layers())
        token_ids = torch.randint(0, mc.vocab_size, (num_tokens,), **i32)
        hidden = self.model(token_ids, positions, ctx)  # [T, hidden]
        rows = torch.arange(cfg.max_num_seqs, device=self.device) % num_tokens
        logits = self.model.compute_logits(hidden[rows]).float()  # [max_num_seqs, vocab]
        logits.softmax(dim=-1).cumsum(dim=-1)  # the sampler's largest temporaries
        del pool, hidden, logits

    def _sampling_row(self, row: SampleRow) -> SamplingRow:
        params = row.params
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = self._generators.get(row.request_id)
            if generator is None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed % (2**63))
                self._generators[row.request_id] = generator
        return SamplingRow(params, generator, row.prompt_token_ids or (), row.output_token_ids or (),
                           row.blocked_token_ids, row.token_bitmask)


class PendingStep:
    """A submitted step's sampled tokens: copied to the host without blocking, read by `result()`."""

    def __init__(self, out: SamplerOutput | None) -> None:
        self._out = out
        self._event = None
        if out is not None and out.token_ids.is_cuda:
            self._out = SamplerOutput(*(None if t is None else _to_pinned(t) for t in out))
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> StepResult:
        out = self._out
        if out is None:
            return StepResult([])
        if self._event is not None:
            self._event.synchronize()
        if out.logprobs is None:
            return StepResult(out.token_ids.tolist())
        return StepResult(out.token_ids.tolist(), out.logprobs.tolist(), out.logprob_token_ids.tolist(),
                          out.ranks.tolist())


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
