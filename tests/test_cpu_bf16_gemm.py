"""The bf16 small-matmul kernel (`kernels/cpu_bf16_gemm.py`, CPUs with AVX512-BF16) against fp32 maths,
and `PackedLinear`'s choice of kernel by row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.kernels import cpu_amx_gemm, cpu_bf16_gemm
from kestrel.kernels.cpu_linear import QUANTIZED_ROWS_BESIDE_BF16, PackedLinear, _bf16_linear, packing_supported
from kestrel.kernels.cpu_quant import quantize_int8

pytestmark = pytest.mark.skipif(not cpu_bf16_gemm.use(), reason="needs the C++ kernels and AVX512-BF16")


def _max_rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).abs().max()) / float(expected.abs().max())


@pytest.mark.parametrize("n, k", [(960, 576), (100, 64), (49, 1536), (64, 2)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 33])
def test_kernel_matches_fp32_matmul(n, k, rows):
    gen = torch.Generator().manual_seed(n * 7 + k + rows)
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    expected = x.float() @ weight.float().t() + bias.float()
    got = cpu_bf16_gemm.linear(x, cpu_bf16_gemm.pack(weight, bias))
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert _max_rel_err(got, expected) < 8e-3  # the output's bf16 rounding (2^-8 relative)
    no_bias = cpu_bf16_gemm.linear(x, cpu_bf16_gemm.pack(weight))
    assert _max_rel_err(no_bias, x.float() @ weight.float().t()) < 8e-3


def test_rows_do_not_change_each_others_results_and_leading_dims_are_kept():
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(200, 128, generator=gen) * 0.05).bfloat16()
    packed = cpu_bf16_gemm.pack(weight)
    x = torch.randn(2, 9, 128, generator=gen).bfloat16()
    batched = cpu_bf16_gemm.linear(x, packed)
    assert batched.shape == (2, 9, 200)
    alone = torch.stack([cpu_bf16_gemm.linear(x[i, j:j + 1], packed)[0] for i in range(2) for j in range(9)])
    assert torch.equal(batched.reshape(18, 200), alone)  # batch invariant: each row alone gives the same bits


@pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16")
def test_packed_linear_takes_the_kernel_for_few_rows_and_caps_the_quantized_rows():
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(96, 64, generator=gen) * 0.1).bfloat16()
    kernel = PackedLinear(weight)
    assert kernel.bf16 is not None  # AMX tiles where the CPU has them, else cpu_bf16_gemm's kernel
    assert kernel.bf16_rows == (cpu_amx_gemm.MAX_ROWS if cpu_amx_gemm.available() else cpu_bf16_gemm.MAX_ROWS)
    for rows in (1, 5, kernel.bf16_rows):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        assert torch.equal(kernel.eager(x), _bf16_linear(x, kernel.bf16))
    x = torch.randn(kernel.bf16_rows + 1, 64, generator=gen).bfloat16()
    assert _max_rel_err(kernel.eager(x), F.linear(x.float(), weight.float())) < 8e-3  # oneDNN
    quantized = PackedLinear(weight, quantized=quantize_int8(weight.float()))
    assert quantized.quantized_rows == min(quantized.small.max_rows, QUANTIZED_ROWS_BESIDE_BF16)
    x = torch.randn(quantized.quantized_rows + 1, 64, generator=gen).bfloat16()
    assert torch.equal(quantized.eager(x), _bf16_linear(x, quantized.bf16))
