"""Vocabulary-parallel embedding and LM head (vocab rows split over TP ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.distributed.parallel_state import SINGLE_RANK, TPGroup
from kestrel.kernels.cpu_quant import (Int4Weight, QuantizedWeight, choose_quantized, int4_supported, int8_supported,
                                       quantize_int4)
from kestrel.kernels.cpu_linear import PackedLinear, pack
from kestrel.layers.linear import linear


REFINE_TOP_K = 16
"""Logits per row recomputed in fp32 after a quantized LM head (greedy and top logprobs stay exact)."""


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
    quantized: QuantizedWeight | None = None
    """The weight quantized (`--cpu-quantized-decode`), handed to the packed kernel by `pack_weights`."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def load_int4(self, loaded: Int4Weight, shard_id=None) -> None:
        """Take the checkpoint's int4 codes of the head (or of the embedding it is tied to)."""
        if self.tp.size != 1:
            raise ValueError("quantized weights need a single tensor-parallel rank")
        if tuple(loaded.codes.shape) != tuple(self.weight.shape):
            raise ValueError(f"int4 LM head of shape {tuple(loaded.codes.shape)} does not fit "
                             f"{tuple(self.weight.shape)}")
        self.quantized = loaded

    def prepare_quantized(self) -> str | None:
        """int4: the checkpoint's codes, else rounded from the weight (its top logits are recomputed from
        the plain weight, so int4 gives the int8 head's greedy tokens at half the bytes); int8 where the
        int4 kernel cannot run this width. Returns which."""
        if self.kernel is not None or not int8_supported():
            return None
        int4 = self.quantized
        if int4 is None and int4_supported(self.weight.shape[1]):
            int4 = quantize_int4(self.weight)
        self.quantized = choose_quantized(self.weight, int4)
        return "int4" if isinstance(self.quantized, Int4Weight) else "int8"

    def pack_weights(self) -> bool:
        """Use a pre-packed CPU kernel; the weight stays (it may be the embedding's too)."""
        if self.kernel is not None:
            return False
        self.kernel = pack(self.weight, quantized=self.quantized, refine_top_k=REFINE_TOP_K)
        self.quantized = None
        return self.kernel is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, hidden] -> logits [R, vocab]
        logits = self.kernel(hidden) if self.kernel is not None else linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
