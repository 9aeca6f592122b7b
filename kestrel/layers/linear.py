"""Column- and row-parallel linear layers, each parameter with its `weight_loader`.

ColumnParallelLinear splits the output features over TP ranks; RowParallelLinear
splits the input features and all-reduces the result. The merged variants
(gate_up, qkv) hold several checkpoint tensors in one matrix so one GEMM does
the work; their loaders take a `shard_id` naming which part a tensor is.

After loading, `pack_weights()` may hand the matmul to a pre-packed CPU kernel
(kestrel.kernels.cpu_linear); the plain weight is then dropped to save memory.

With `--cpu-quantized-decode` a layer also gets a quantized copy of its weight before packing:
the checkpoint's own 4-bit codes when it has them for every row (`load_int4`, through the same
`weight_loader` that places a merged layer's shards: codes, scales and zeros all have one row per
output), else int8 per row rounded from the float weight (`prepare_quantized`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.distributed.parallel_state import SINGLE_RANK, TPGroup
from kestrel.kernels.cpu_quant import GROUP_SIZE, Int4Weight, QuantizedWeight, choose_quantized, int8_supported
from kestrel.kernels.cpu_linear import PackedLinear, pack


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or on a GPU the Triton kernel for a few rows where it beats cuBLAS (kernels/skinny_gemm.py)."""
    if x.is_cuda:
        from kestrel.kernels import skinny_gemm  # lazily: the CPU tests import kernels under the interpreter

        if skinny_gemm.wanted(x, w):
            return skinny_gemm.skinny_linear(x, w, bias)
    return F.linear(x, w, bias)


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by the tensor-parallel size {b}")
    return a // b


class _PackableLinear(nn.Module):
    """Holds `weight` [out, in]; `pack_weights` swaps F.linear for a pre-packed kernel where supported."""

    kernel: PackedLinear | None = None
    quantized: QuantizedWeight | None = None
    """The weight quantized (`prepare_quantized`), handed to the packed kernel by `pack_weights`."""
    _int4: tuple[Int4Weight, torch.Tensor] | None = None  # codes loaded so far, [out, 1] rows given

    def load_int4(self, loaded: Int4Weight, shard_id=None) -> None:
        """Take one checkpoint tensor's int4 codes (a shard of a merged layer) for its rows."""
        if self.tp.size != 1:
            raise ValueError("quantized weights need a single tensor-parallel rank")
        if self._int4 is None:
            n, k = self.weight.shape
            self._int4 = (Int4Weight(torch.zeros(n, k, dtype=torch.uint8), torch.zeros(n, k // GROUP_SIZE),
                                     torch.zeros(n, k // GROUP_SIZE)), torch.zeros(n, 1, dtype=torch.bool))
        ours, rows = self._int4
        ones = torch.ones(loaded.codes.shape[0], 1, dtype=torch.bool)
        for dst, src in zip((*ours, rows), (*loaded, ones)):
            self.weight_loader(dst, src, *(() if shard_id is None else (shard_id,)))

    def prepare_quantized(self) -> str | None:
        """int4 if the checkpoint gave codes for every row, else int8 rounded from the weight; which."""
        if self.kernel is not None or not int8_supported():
            return None
        complete = self._int4 is not None and bool(self._int4[1].all())  # codes for every row
        self.quantized = choose_quantized(self.weight, self._int4[0] if complete else None)
        self._int4 = None
        return "int4" if isinstance(self.quantized, Int4Weight) else "int8"

    def _pack(self, with_bias: bool) -> bool:
        if self.kernel is not None:
            return False
        self.kernel = pack(self.weight, self.bias if with_bias else None, self.quantized)
        self.quantized = None
        if self.kernel is None:
            return False
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        return True

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return linear(x, self.weight, bias)


class ColumnParallelLinear(_PackableLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features_per_rank = _divide(out_features, tp.size)
        self.weight = nn.Parameter(torch.empty(self.out_features_per_rank, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[0]
        _copy(param, loaded.narrow(0, self.tp.rank * n, n))

    def pack_weights(self) -> bool:
        return self._pack(with_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)  # [T, out_per_rank]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matrix (e.g. gate_proj and up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp: TPGroup = SINGLE_RANK) -> None:
        super().__init__(in_features, sum(output_sizes), bias, tp)
        self.output_sizes_per_rank = [_divide(s, tp.size) for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.output_sizes_per_rank[shard_id]
        offset = sum(self.output_sizes_per_rank[:shard_id])
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; heads are split over TP ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup = SINGLE_RANK) -> None:
        self.num_heads = _divide(num_heads, tp.size)
        self.num_kv_heads = _divide(num_kv_heads, tp.size)
        self.head_dim = head_dim
        total = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, total, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))


class RowParallelLinear(_PackableLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.in_features_per_rank = _divide(in_features, tp.size)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[1]
        _copy(param, loaded.narrow(1, self.tp.rank * n, n))

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy(param, loaded)

    def pack_weights(self) -> bool:
        return self._pack(with_bias=False)  # the bias is added once, after the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x, None)  # [T, out_features], partial sum over ranks
        out = self.tp.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter "
                         f"of shape {tuple(dst.shape)}")
    dst.data.copy_(src)
