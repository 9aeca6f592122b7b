"""The AMX tile kernels (`kernels/cpu_amx_gemm.py`) against fp32 maths: bf16 to bf16 rounding, int8 to the
rounding it documents (weights per column, activations per row), rows independent of the row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.kernels import cpu_amx_gemm

pytestmark = pytest.mark.skipif(not cpu_amx_gemm.available(), reason="needs the C++ kernels and AMX")


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm())


@pytest.mark.parametrize("n,k", [(96, 64), (100, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_matches_fp32_maths_to_bf16_rounding(n, k, with_bias):
    gen = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, generator=gen) if with_bias else None
    packed = cpu_amx_gemm.pack_bf16(weight, bias)
    for rows in (1, 15, 16, 17, 33, 47, 64, 100, 300):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        expected = F.linear(x.float(), weight.float(), bias)
        got = cpu_amx_gemm.linear(x, packed)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        # fp32 accumulation, one bf16 rounding of the result (2^-9 relative)
        assert ((got.float() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-3).all(), rows


def test_int8_is_the_rounded_maths_it_documents():
    gen = torch.Generator().manual_seed(7)
    n, k = 200, 128
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, generator=gen)
    packed = cpu_amx_gemm.pack_int8(weight, bias)
    wq, ws = cpu_amx_gemm.quantize_int8(weight)
    assert packed.scale[:n].equal(ws) and wq.abs().max() == 127
    for rows in (1, 5, 16, 33):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        xs = x.float().abs().amax(dim=1, keepdim=True) / 127
        xq = (x.float() * (1 / xs)).round().clamp(-127, 127)  # as the kernel rounds: times the inverse
        emulated = (xq.double() @ wq.double().T) * xs.double() * ws.double() + bias.double()  # [rows, n]
        got = cpu_amx_gemm.linear(x, packed)
        assert ((got.double() - emulated).abs() <= emulated.abs() * 2 ** -8 + 1e-4).all(), rows
        assert _rel_err(got, F.linear(x.float(), weight.float(), bias)) < 0.02


@pytest.mark.parametrize("int8", [False, True])
def test_a_row_does_not_depend_on_the_rows_beside_it(int8):
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(320, 576, generator=gen) * 0.05).bfloat16()
    packed = (cpu_amx_gemm.pack_int8 if int8 else cpu_amx_gemm.pack_bf16)(weight)
    x = torch.randn(2, 20, 576, generator=gen).bfloat16()  # a 3-D input keeps its leading shape
    batched = cpu_amx_gemm.linear(x, packed)
    assert batched.shape == (2, 20, 320)
    alone = torch.stack([torch.cat([cpu_amx_gemm.linear(x[i, j:j + 1], packed) for j in range(20)]) for i in range(2)])
    assert torch.equal(batched, alone)
    assert cpu_amx_gemm.linear(x[0, :0], packed).shape == (0, 320)


def test_int8_handles_zero_and_large_rows():
    weight = torch.randn(64, 64).bfloat16()
    packed = cpu_amx_gemm.pack_int8(weight)
    x = torch.zeros(3, 64).bfloat16()
    x[1] = 1e30  # per-row scales: a huge row neither overflows nor disturbs its neighbours
    x[2] = torch.randn(64).bfloat16()
    got = cpu_amx_gemm.linear(x, packed).float()
    assert torch.equal(got[0], torch.zeros(64))
    assert torch.isfinite(got[1]).all()
    assert _rel_err(got[2:], F.linear(x[2:].float(), weight.float())) < 0.02
