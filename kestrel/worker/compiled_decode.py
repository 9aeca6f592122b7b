"""Compiled decode steps on CPU: each decoder layer (one graph for all) and the LM head, torch.compile'd.

An eager CPU decode step dispatches ~2000 small ops from Python (30 layers of norms, RoPE, KV
writes, gathers, SDPA, activations: see benchmarks/cpu/README.md); inductor fuses everything
between the matmuls into a few C++ loops per layer, and the attention reads KV through the slot
table inside its reductions (`attention/slot_decode.py`). Matmuls stay on the oneDNN-packed
weights, through the `kestrel::packed_linear` op (kernels/cpu_linear.py).

Regional compilation: all layers share one compiled graph (their parameters are its inputs; the
first layer adds a zero residual so it runs the same graph), so compile time is that of one layer
and the head, not of 30 unrolled layers (which took minutes on 2 cores). Batch size and KV width
are dynamic dimensions. A batch of
one request runs as two (a padding row: token 0, position 0, slot -1 so its KV write lands in the
pool's spare slot, attending slot 0 only; its logits are dropped), and the width is at least 2, so
no size-1 specialisation forces a second compile. Prefill and mixed steps stay eager. The first
decode step compiles (tens of seconds on 2 cores; inductor caches the result on disk, so a later
process with the same model and torch starts faster); `warmup()` does that at start-up.

With `--cpu-quantized-decode`, steps of up to `quantized_max_rows` rows take a second graph that calls
the int4 / int8 kernels in the graph itself (`kernels/cpu_linear.graph_rows`), and a lone request
is not padded: it gets a third graph, of one row (the int4 kernel's time grows with the rows: ~25%
from one to two). With bf16 weights on AVX512-BF16, steps of up to `bf16_max_rows` rows take a
graph that calls the small-matmul kernel's C++ op directly (AMX tiles where the CPU has them, 512 rows;
else `cpu_bf16_gemm`). `warmup()` compiles them all. Once warm, steps run with
dynamo's guard evaluation skipped except for the guards that tell the graphs apart (`unguarded.py`):
every step's inputs have the dtypes, devices and dynamic dimensions the graphs were compiled for.
"""

from __future__ import annotations

import logging
import time

import torch

from kestrel.attention import AttentionContext, BatchLayout
from kestrel.attention.slot_decode import SlotDecodeAttention, SlotDecodeMeta
from kestrel.kernels.cpu_linear import graph_rows
from kestrel.worker.unguarded import UnguardedCalls

logger = logging.getLogger(__name__)

MIN_ROWS = 2
"""Smallest batch the graph runs (a single request gets a padding row)."""
FUSED_LOOP_THREADS = 1
"""Threads of inductor's fused loops (the matmuls keep torch's threads). At decode sizes they are
microseconds of work, and an OpenMP region costs barriers: on a 2-core machine shared with the API,
detokenizer and client processes (or other work), a thread descheduled at a barrier stalls the
region for a time slice. Measured on a loaded 2-core machine: 2-thread fused loops took 1.3 s of a
2.0 s profiled batch-1 step (benchmarks/cpu/README.md)."""


class CompiledDecodeRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, max_batch_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch_size = max_batch_size
        self.device = device
        self.backend = SlotDecodeAttention()
        options = {"cpp.threads": FUSED_LOOP_THREADS}
        self._layer = torch.compile(_layer_step, fullgraph=True, options=options)
        self._head = torch.compile(_head_step, fullgraph=True, options=options)
        self.quantized_max_rows = max((getattr(getattr(m, "kernel", None), "quantized_rows", 0)
                                       for m in model.modules()), default=0)
        """Steps of at most this many rows (padding included) take the graph of the quantized weights
        (`--cpu-quantized-decode`; `cpu_linear.PackedLinear.quantized_rows`); 0: no layer has one."""
        self.quantized = self.quantized_max_rows > 0
        self.bf16_max_rows = max((getattr(getattr(m, "kernel", None), "bf16_rows", 0) for m in model.modules()),
                                 default=0)
        """bf16 weights in a small-matmul kernel's layout (`cpu_linear.PackedLinear.bf16_rows`): steps of up to
        this many rows call its op in the graph; 0: none."""
        self.small_bf16 = self.bf16_max_rows > 0
        self._calls = UnguardedCalls("decode step")
        self.num_runs = 0
        """Decode steps run compiled (for tests and logs)."""

    def can_run(self, layout: BatchLayout) -> bool:
        return layout.is_decode_only and layout.num_reqs <= self.max_batch_size

    def warmup(self) -> float:
        """Compile now, on fake decode steps (they write only the spare slot); returns seconds.

        One step of each kind the batch can be (`_graph_rows`): two rows; with quantized weights also one
        row and `quantized_max_rows + 1` rows; with a bf16 small-matmul kernel, `bf16_max_rows + 1` rows.
        """
        start = time.perf_counter()
        sizes = [MIN_ROWS]
        if self.quantized:
            sizes += [1, self.quantized_max_rows + 1]
        if self.small_bf16:
            sizes.append(self.bf16_max_rows + 1)
        sizes = sorted({rows for rows in sizes if rows <= max(self.max_batch_size, MIN_ROWS)})
        i32 = dict(dtype=torch.int32, device=self.device)
        for rows in sizes:
            width = rows + 3  # width != rows: the two dimensions get their own symbols
            with torch.inference_mode():  # as the steps: tensors made outside would not match the guards
                meta = SlotDecodeMeta(torch.full((rows,), -1, **i32),
                                      torch.zeros(rows, width, dtype=torch.int64, device=self.device),
                                      torch.ones(rows, width, dtype=torch.bool, device=self.device))
                self._run(torch.zeros(rows, **i32), torch.zeros(rows, **i32), meta, mark=True)
        self._calls.warm = True
        elapsed = time.perf_counter() - start
        logger.info("compiled the CPU decode step in %.1f s (%d graph%s)", elapsed, len(sizes),
                    "s" if len(sizes) > 1 else "")
        return elapsed

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """The decode step of `layout` (every request samples): logits [R, vocab]."""
        self.num_runs += 1
        r = layout.num_reqs
        width = max(2, max(layout.seq_lens))
        table = layout.slot_table.index_select(0, layout.req_rows)[:, :width].long()  # [R, L]
        mask = torch.arange(width, device=self.device).view(1, -1) < layout.seq_lens_t.view(-1, 1)
        kv_index = torch.where(mask, table, table[:, :1])
        slot_mapping = layout.slot_mapping
        if r < (1 if self.quantized else MIN_ROWS):
            pad = MIN_ROWS - r
            token_ids = _pad(token_ids, pad, 0)
            positions = _pad(positions, pad, 0)
            slot_mapping = _pad(slot_mapping, pad, -1)
            kv_index = torch.cat([kv_index, kv_index.new_zeros(pad, width)])
            pad_mask = mask.new_zeros(pad, width)
            pad_mask[:, 0] = True
            mask = torch.cat([mask, pad_mask])
        return self._run(token_ids, positions, SlotDecodeMeta(slot_mapping, kv_index, mask))[:r]

    def _run(self, token_ids, positions, meta: SlotDecodeMeta, mark: bool = False) -> torch.Tensor:
        rows = token_ids.shape[0]
        kind = self._graph_rows(rows)
        with graph_rows(kind):
            return self._forward(token_ids, positions, meta, mark, key=(kind, rows == 1))

    def _graph_rows(self, rows: int) -> str:
        """Which graph a step of `rows` rows takes (`cpu_linear.graph_rows`)."""
        if self.quantized and rows <= self.quantized_max_rows:
            return "quantized"
        if self.small_bf16 and rows <= self.bf16_max_rows:
            return "small"
        return "large"

    def _forward(self, token_ids, positions, meta: SlotDecodeMeta, mark: bool, key: tuple[str, bool]) -> torch.Tensor:
        """The step's layers and head; `key` (graph kind, one row) names the compiled graphs it takes."""
        decoder = self.model.model
        x = decoder.embed_tokens(token_ids)  # [R, hidden]
        rope = decoder.rotary.for_positions(positions)
        residual = torch.zeros_like(x)  # layer 0 adds zeros: every layer runs the same graph
        if mark:  # batch rows (from two) and KV width are dynamic: one compile per graph
            for t in (x, residual, rope.cos, rope.sin, meta.slot_mapping, meta.kv_index, meta.mask):
                if t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
            for t in (meta.kv_index, meta.mask):
                torch._dynamo.mark_dynamic(t, 1)
        ctx = AttentionContext(self.backend, meta, self.kv_caches)
        for layer, kv_cache in zip(decoder.layers, self.kv_caches, strict=True):
            # A call that falls back to full guards reruns: its KV write is the same values again.
            x, residual = self._calls(self._layer, layer, rope, x, residual, ctx, kv_cache, key=key)
        return self._calls(self._head, self.model, x, residual, key=key)  # [R, vocab]


def _layer_step(layer, rope, x, residual, ctx, kv_cache):
    return layer(rope, x, residual, ctx, kv_cache)


def _head_step(model, x, residual):
    hidden, _ = model.model.norm(x, residual)
    return model.compute_logits(hidden)


def _pad(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    return torch.cat([t, t.new_full((n,), value)])
