"""Runs one scheduled step on one device: flat batch in, sampled tokens out.

Owns the model, the KV pool and the sampler. `execute` turns a
`SchedulerOutput` into a flat ("nopad") token batch, runs the model, takes the
hidden state of the last scheduled token of every request whose computed
tokens catch up with its tokens, and samples those rows. Per-request torch
generators (for seeded requests) live here until `release`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kestrel.attention.backend import AttentionContext, BatchLayout
from kestrel.attention.torch_backend import TorchAttentionBackend
from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.pool import KVPool
from kestrel.outputs import Logprob, TokenLogprobs
from kestrel.request import Request
from kestrel.runner.sampler import Sampler, SamplingRow
from kestrel.scheduler import SchedulerOutput


class SampledToken(NamedTuple):
    request: Request
    token_id: int
    logprobs: TokenLogprobs | None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, kv: KVCacheManager,
                 device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.kv = kv
        self.device = device
        self.backend = TorchAttentionBackend()
        self.sampler = Sampler(seed)
        self.kv_caches = [pool.layer(i) for i in range(pool.kv.shape[0])]
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        input_ids, positions, layout, sample_idx, to_sample = self._prepare(sched)
        ctx = AttentionContext(self.backend, self.backend.prepare(layout), self.kv_caches)
        hidden = self.model(input_ids, positions, ctx)  # [T, hidden]
        if not to_sample:
            return []
        logits = self.model.compute_logits(hidden[sample_idx])  # [R_sample, vocab]
        rows = [self._sampling_row(req) for req in to_sample]
        out = self.sampler(logits, rows)
        token_ids = out.token_ids.tolist()
        logprobs = self._logprob_records(out, to_sample)
        return [SampledToken(r, t, lp) for r, t, lp in zip(to_sample, token_ids, logprobs)]

    def release(self, request_id: str) -> None:
        """Forget per-request state (the request finished or was aborted)."""
        self._generators.pop(request_id, None)

    def _prepare(self, sched: SchedulerOutput):
        ids: list[int] = []
        pos: list[int] = []
        slot_rows: list[torch.Tensor] = []
        q_lens, s_lens, rows, sample_idx, to_sample = [], [], [], [], []
        table = self.kv.req_to_token
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            row = self.kv.row_of(req.request_id)
            ids.extend(req.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slot_rows.append(table[row, start:start + n])
            q_lens.append(n)
            s_lens.append(start + n)
            rows.append(row)
            if start + n == req.num_tokens:
                sample_idx.append(len(ids) - 1)
                to_sample.append(req)
        dev = self.device
        layout = BatchLayout(
            query_lens=q_lens,
            seq_lens=s_lens,
            req_rows=torch.tensor(rows, dtype=torch.int64).to(dev),
            req_to_token=table.to(dev) if table.device != dev else table,
            slot_mapping=torch.cat(slot_rows).to(dev),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev)   # [T]
        positions = torch.tensor(pos, dtype=torch.int64).to(dev)   # [T]
        return input_ids, positions, layout, torch.tensor(sample_idx, device=dev), to_sample

    def _sampling_row(self, req: Request) -> SamplingRow:
        params = req.params
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = self._generators.get(req.request_id)
            if gen is None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed % (2**63))
                self._generators[req.request_id] = gen
        blocked: tuple[int, ...] = ()
        if req.num_output_tokens < params.min_tokens:
            eos = () if params.ignore_eos else getattr(self.model.cfg, "eos_token_ids", ())
            blocked = tuple(eos) + params.stop_token_ids
        return SamplingRow(params, gen, req.prompt_token_ids, req.output_token_ids, blocked)

    @staticmethod
    def _logprob_records(out, reqs: list[Request]) -> list[TokenLogprobs | None]:
        if out.logprobs is None:
            return [None] * len(reqs)
        lps, ids, ranks = out.logprobs.tolist(), out.logprob_token_ids.tolist(), out.ranks.tolist()
        records: list[TokenLogprobs | None] = []
        for i, req in enumerate(reqs):
            k = req.params.logprobs
            if k is None:
                records.append(None)
                continue
            rec = {ids[i][0]: Logprob(lps[i][0], ranks[i])}
            for j in range(1, k + 1):
                rec.setdefault(ids[i][j], Logprob(lps[i][j], j))
            records.append(rec)
        return records
