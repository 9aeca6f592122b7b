"""oneDNN-packed linear: same maths as F.linear, and rows independent of the batch size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.kernels.cpu_linear import PackedLinear, packing_supported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576)])
def test_packed_rows_do_not_depend_on_batch_size(dtype, in_features, out_features):
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN {dtype} on this machine")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    linear = PackedLinear(weight, bias)
    # bf16 on AVX512-BF16: up to `bf16_rows` rows run on the small-matmul kernel (AMX or cpu_bf16_gemm),
    # more on oneDNN; each kernel is batch invariant on its own range (the two round differently).
    small = linear.bf16_rows
    x = torch.randn(small + 33, in_features, generator=gen).to(dtype)
    full = linear(x)  # [small + 33, out]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (full.float() - F.linear(x.float(), weight.float(), bias.float())).abs().max().item() <= tol
    for rows in (small + 2, small + 5, small + 16):
        assert torch.equal(linear(x[:rows]), full[:rows]), rows
    if small:
        full = linear(x[:small])
    for rows in [r for r in (1, 2, 5, 16) if not small or r <= small]:
        assert torch.equal(linear(x[:rows]), full[:rows]), rows
    assert linear(x[0]).shape == (out_features,)  # a 1-D input keeps its shape
    assert torch.equal(linear(x[0]), full[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_op_runs_the_packed_weight_like_the_python_path(dtype):
    """`kestrel_cpu_linear::linear` (what decode graphs call) gives `_matmul`'s bits, one row as two, any
    leading shape, bias included; once the kernel is freed its handle is refused, not read."""
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN {dtype} on this machine")
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(200, 96, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(200, generator=gen).to(dtype)
    linear = PackedLinear(weight, bias)
    if not linear.native:
        pytest.skip("the C++ kernels are not built here")
    op = torch.ops.kestrel_cpu_linear.linear
    x = torch.randn(9, 96, generator=gen).to(dtype)
    full = linear._matmul(x)
    assert torch.equal(op(x, linear.handle, 200), full)
    assert torch.equal(op(x[:1], linear.handle, 200), full[:1])  # one row: computed as two
    assert torch.equal(op(x[:6].view(2, 3, 96), linear.handle, 200), full[:6].view(2, 3, 200))
    no_bias = PackedLinear(weight)
    assert torch.equal(op(x, no_bias.handle, 200), no_bias._matmul(x))
    handle = linear.handle
    del linear
    with pytest.raises(RuntimeError, match="was freed"):
        op(x, handle, 200)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_op_picks_the_kernel_eager_picks(dtype):
    """`kestrel_cpu_linear::linear_any` (what compiled prefill pieces call) gives `eager`'s bits at every row
    count: the small bf16 kernel up to `bf16_rows` (where there is one), oneDNN beyond; bias included."""
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN {dtype} on this machine")
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(200, 128, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(200, generator=gen).to(dtype)
    for linear in (PackedLinear(weight, bias), PackedLinear(weight)):
        if not linear.native:
            pytest.skip("the C++ kernels are not built here")
        assert (linear.bf16 is not None) == (dtype == torch.bfloat16 and linear.bf16_rows > 0)
        for rows in sorted({1, 3, max(linear.bf16_rows, 1), linear.bf16_rows + 1, linear.bf16_rows + 7}):
            x = torch.randn(rows, 128, generator=gen).to(dtype)
            got = torch.ops.kestrel_cpu_linear.linear_any(x, linear.handle, 200)
            assert torch.equal(got, linear.eager(x)), rows
        x = torch.randn(2, 3, 128, generator=gen).to(dtype)
        assert torch.equal(torch.ops.kestrel_cpu_linear.linear_any(x, linear.handle, 200), linear.eager(x))
