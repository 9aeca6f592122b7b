"""Vocabulary-parallel embedding and LM head (vocab rows split over TP ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.distributed.parallel_state import SINGLE_RANK, TPGroup
from kestrel.kernels.cpu_linear import PackedLinear, pack


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.num_per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.num_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.start: self.start + self.num_per_rank]
        if part.shape[1] != param.shape[1]:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit hidden size {param.shape[1]}")
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        valid = (local >= 0) & (local < self.num_per_rank)
        out = F.embedding(local.clamp(0, self.num_per_rank - 1), self.weight)
        out = out * valid.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding."""

    kernel: PackedLinear | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def pack_weights(self) -> bool:
        """Use a pre-packed CPU kernel; the weight stays (it may be the embedding's too)."""
        if self.kernel is not None:
            return False
        self.kernel = pack(self.weight)
        return self.kernel is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, hidden] -> logits [R, vocab]
        logits = self.kernel(hidden) if self.kernel is not None else F.linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
