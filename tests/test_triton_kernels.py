"""Triton kernels of `kestrel/kernels/` against their plain-torch references (`tests/kernel_refs.py`).

Without a CUDA device the kernels run on CPU under the Triton interpreter, on tiny
shapes; with one, the same tests run on the GPU at somewhat larger shapes. Every output
that is not written in place is poisoned with NaN before the call, so an element a kernel
fails to write fails the test.
"""

from __future__ import annotations

import os
import sys

import torch

# The interpreter is chosen when a kernel is decorated, i.e. when its module is first imported,
# so this must come before anything imports triton or a kernel module.
if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from kernel_refs import (  # noqa: E402
    make_kv_cache,
    make_req_to_token,
    make_rope_tables,
    ref_decode_attention,
    ref_extend_attention,
    ref_fused_add_rms_norm,
    ref_rms_norm,
    ref_rotary,
    ref_silu_and_mul,
    ref_store_kv,
    rel_err,
)

from kestrel.kernels.decode_attention import decode_attention, decode_workspace_size  # noqa: E402
from kestrel.kernels.extend_attention import extend_attention  # noqa: E402
from kestrel.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from kestrel.kernels.rotary import apply_rotary  # noqa: E402
from kestrel.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from kestrel.kernels.skinny_gemm import ENABLED, SkinnyTuning, faster_here, skinny_linear, wanted  # noqa: E402
from kestrel.kernels.store_kv import store_kv  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def test_interpreter_is_active_without_a_gpu():
    """A kernel module imported before TRITON_INTERPRET was set would try to compile for a GPU."""
    if ON_GPU:
        pytest.skip("compiled kernels on a GPU")
    from triton.runtime.interpreter import InterpretedFunction

    kernel_modules = [name for name in sys.modules if name.startswith("kestrel.kernels.")
                      and name != "kestrel.kernels.triton_compat"]
    assert kernel_modules
    for name in kernel_modules:
        for attr, value in vars(sys.modules[name]).items():
            if attr.startswith("_") and attr.endswith("_kernel"):
                assert isinstance(value, InterpretedFunction), f"{name}.{attr} is not interpreted"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """q, k, v as strided views of one fused [T, (H + 2 KH) * D] buffer, as the qkv projection gives."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


# ---------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 32), (1, 64), (3, 48)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_strided_views_and_padding(dtype, num_kv_heads, head_dim, slot_dtype):
    gen = _gen(1)
    num_tokens, num_slots = (13, 40) if not ON_GPU else (300, 1000)
    _, k, v = _qkv_views(num_tokens, 4, num_kv_heads, head_dim, dtype, gen)
    assert not k.is_contiguous()
    k_cache, v_cache = make_kv_cache(num_slots, num_kv_heads, head_dim, dtype, "cpu", gen)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    slot_mapping = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slot_mapping[[2, 7, num_tokens - 1]] = -1  # padding tokens
    slot_mapping = slot_mapping.to(slot_dtype).to(DEVICE)
    ref_k, ref_v = ref_store_kv(k, v, k_cache, v_cache, slot_mapping)

    store_kv(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, ref_k)  # a copy is exact, padding left every other slot untouched
    assert torch.equal(v_cache, ref_v)


def test_store_kv_only_padding_and_empty():
    gen = _gen(2)
    k_cache, v_cache = make_kv_cache(8, 2, 32, torch.float32, DEVICE, torch.Generator(DEVICE).manual_seed(0))
    before_k, before_v = k_cache.clone(), v_cache.clone()
    _, k, v = _qkv_views(3, 2, 2, 32, torch.float32, gen)
    store_kv(k, v, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int32, device=DEVICE))
    store_kv(k[:0], v[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


def test_store_kv_rejects_bad_inputs():
    k = torch.zeros(4, 2, 32, device=DEVICE)
    cache = torch.zeros(8, 2, 32, device=DEVICE)
    slots = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="share one dtype"):
        store_kv(k, k, cache.bfloat16(), cache.bfloat16(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, cache, slots.float())
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        store_kv(k, k, torch.zeros(8, 4, 32, device=DEVICE), cache, slots)
    with pytest.raises(ValueError, match="last dim"):
        store_kv(k.transpose(1, 2).contiguous().transpose(1, 2), k, cache, cache, slots)


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

# seq_len 0 is a padding row, 1 a fresh request; the rest are not multiples of BLOCK_N (64).
DECODE_SEQ_LENS = [1, 0, 77, 130, 64, 5] if not ON_GPU else [1, 0, 77, 1000, 640, 4100, 64, 5, 129]


def _decode_case(seq_lens, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = _gen(seed)
    batch = len(seq_lens)
    num_slots = sum(seq_lens) + 50
    k_cache, v_cache = make_kv_cache(num_slots, num_kv_heads, head_dim, dtype, "cpu", gen)
    req_to_token, req_rows = make_req_to_token(seq_lens, num_slots, max(seq_lens) + 9, DEVICE, gen)
    q, _, _ = _qkv_views(batch, num_heads, num_kv_heads, head_dim, dtype, gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache.to(DEVICE), v_cache.to(DEVICE), req_to_token, req_rows, seq_lens_t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,num_kv_splits",
                         [(2, 2, 32, 1), (8, 2, 64, 3), (8, 1, 32, 4), (4, 2, 32, 16)])
def test_decode_attention(dtype, num_heads, num_kv_heads, head_dim, num_kv_splits):
    q, k_cache, v_cache, req_to_token, req_rows, seq_lens = _decode_case(
        DECODE_SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype, seed=3)
    assert not q.is_contiguous()  # a view of the fused qkv buffer
    sm_scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    workspace = torch.full((decode_workspace_size(len(DECODE_SEQ_LENS) + 3, num_heads, head_dim, num_kv_splits),),
                           float("nan"), device=DEVICE)
    result = decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens, out, sm_scale,
                              num_kv_splits, workspace)
    assert result is out
    ref = ref_decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens, sm_scale)
    assert torch.equal(out[1].float(), torch.zeros_like(ref[1]))  # the padding row: zeros, finite
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 1, 128), (6, 3, 48)])
def test_decode_attention_other_head_dims(dtype, num_heads, num_kv_heads, head_dim):
    """head_dim 128 (Llama), and 48 (not a power of two: masked), with the workspace allocated inside."""
    seq_lens = [3, 70, 0] if not ON_GPU else [3, 700, 0, 2049]
    q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t = _decode_case(
        seq_lens, num_heads, num_kv_heads, head_dim, dtype, seed=4)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, out, 0.1, 2)
    ref = ref_decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, 0.1)
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_attention_rejects_bad_inputs():
    q, k_cache, v_cache, req_to_token, req_rows, seq_lens = _decode_case([4, 2], 4, 2, 32, torch.float32, seed=5)
    out = torch.empty(q.shape, device=DEVICE)
    args = (q, k_cache, v_cache, req_to_token, req_rows, seq_lens, out, 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(q[:, :3], k_cache, v_cache, req_to_token, req_rows, seq_lens, out[:, :3], 0.1, 2)
    with pytest.raises(ValueError, match="workspace"):
        decode_attention(*args, 2, torch.empty(10, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens[:1], out, 0.1, 2)
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention(*args, 0)
    with pytest.raises(ValueError, match="share one dtype"):
        decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens, out.bfloat16(), 0.1, 2)


# ---------------------------------------------------------------------------------------------
# extend_attention
# ---------------------------------------------------------------------------------------------

# (cached prefix, new tokens) per request: fresh prompts, a one-token prompt, prefixes of 1 and of
# many positions (a multiple of BLOCK_N and not), and q_len 1 requests mixed in (decode in a prefill step).
EXTEND_CASES = ([(0, 1), (0, 37), (1, 20), (45, 70), (100, 1), (64, 33)] if not ON_GPU else
                [(0, 1), (0, 300), (1, 129), (700, 257), (2000, 1), (128, 512), (5, 64), (63, 2)])


def _extend_case(cases, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = _gen(seed)
    q_lens = [q_len for _, q_len in cases]
    seq_lens = [prefix + q_len for prefix, q_len in cases]
    num_slots = sum(seq_lens) + 50
    k_cache, v_cache = make_kv_cache(num_slots, num_kv_heads, head_dim, dtype, "cpu", gen)
    req_to_token, req_rows = make_req_to_token(seq_lens, num_slots, max(seq_lens) + 9, DEVICE, gen)
    q, _, _ = _qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    q_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache.to(DEVICE), v_cache.to(DEVICE), req_to_token, req_rows, q_start_loc, seq_lens_t, max(q_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 32), (8, 2, 64), (8, 1, 32)])
def test_extend_attention(dtype, num_heads, num_kv_heads, head_dim):
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, max_q_len = _extend_case(
        EXTEND_CASES, num_heads, num_kv_heads, head_dim, dtype, seed=6)
    assert not q.is_contiguous()
    sm_scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    result = extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out,
                              sm_scale, max_q_len)
    assert result is out
    ref = ref_extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, sm_scale)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 1, 128), (6, 3, 48)])
def test_extend_attention_other_head_dims(dtype, num_heads, num_kv_heads, head_dim):
    cases = [(0, 9), (70, 3), (2, 1)] if not ON_GPU else [(0, 900), (1000, 300), (2, 1)]
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, max_q_len = _extend_case(
        cases, num_heads, num_kv_heads, head_dim, dtype, seed=7)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out, 0.1, max_q_len)
    ref = ref_extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, 0.1)
    assert rel_err(out, ref) < TOL[dtype]


def test_extend_matches_decode_for_single_tokens():
    """q_len 1 everywhere: extend and decode are the same maths."""
    cases = [(0, 1), (40, 1), (99, 1)]
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, _ = _extend_case(
        cases, 4, 2, 32, torch.float32, seed=8)
    out_extend = torch.full(q.shape, float("nan"), device=DEVICE)
    out_decode = torch.full(q.shape, float("nan"), device=DEVICE)
    extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out_extend, 0.2, 1)
    decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens, out_decode, 0.2, 2)
    assert rel_err(out_extend, out_decode) < 1e-5


def test_extend_attention_rejects_bad_inputs():
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, max_q_len = _extend_case(
        [(0, 3), (2, 2)], 4, 2, 32, torch.float32, seed=9)
    out = torch.empty(q.shape, device=DEVICE)
    with pytest.raises(ValueError, match="q_start_loc"):
        extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc[:-1], seq_lens, out, 0.1, 3)
    with pytest.raises(ValueError, match="max_query_len"):
        extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, out, 0.1, 3.0)
    with pytest.raises(ValueError, match="contiguous"):
        extend_attention(q, k_cache[:, :1], v_cache[:, :1], req_to_token, req_rows, q_start_loc, seq_lens,
                         out, 0.1, 3)


# ---------------------------------------------------------------------------------------------
# rms_norm, fused_add_rms_norm
# ---------------------------------------------------------------------------------------------

NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _norm_inputs(num_tokens, hidden, dtype, seed):
    """x as a strided view (every other row of a bigger buffer), a residual, and a weight near 1."""
    gen = _gen(seed)
    x = (torch.randn(2 * num_tokens, hidden + 3, generator=gen) * 3).to(dtype).to(DEVICE)[::2, :hidden]
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm(dtype, hidden):
    num_tokens = 7 if not ON_GPU else 300
    x, _, weight = _norm_inputs(num_tokens, hidden if not ON_GPU else hidden * 41, dtype, seed=10)
    assert not x.is_contiguous()
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
    assert rms_norm(x, weight, 1e-5, out) is out
    ref = ref_rms_norm(x, weight, 1e-5)
    assert rel_err(out, ref) < NORM_TOL[dtype]
    assert rel_err(rms_norm(x, weight, 1e-5), ref) < NORM_TOL[dtype]  # out allocated inside


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_fused_add_rms_norm(dtype, hidden):
    num_tokens = 7 if not ON_GPU else 300
    x, residual, weight = _norm_inputs(num_tokens, hidden if not ON_GPU else hidden * 41, dtype, seed=11)
    ref_out, ref_residual = ref_fused_add_rms_norm(x, residual, weight, 1e-6)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert out is x and new_residual is residual  # in place
    if ON_GPU or dtype == torch.float32:
        assert torch.equal(residual, ref_residual)  # the sum, rounded to the dtype: exact
    else:  # the interpreter rounds float32 -> bf16 toward zero where the GPU rounds to nearest: 1 ulp
        ulp = ref_residual.float().abs() * 2.0 ** -7
        assert ((residual.float() - ref_residual.float()).abs() <= ulp).all()
    assert rel_err(x, ref_out) < NORM_TOL[dtype]


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(64, dtype=torch.bfloat16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(4, 32, device=DEVICE), torch.ones(64, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rms_norm(x.t().contiguous().t(), torch.ones(64, device=DEVICE), 1e-5)


# ---------------------------------------------------------------------------------------------
# apply_rotary
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 32), (8, 2, 64), (3, 1, 48)])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_apply_rotary_on_qkv_views(dtype, num_heads, num_kv_heads, head_dim, pos_dtype):
    gen = _gen(12)
    num_tokens, max_position = (11, 64) if not ON_GPU else (500, 8192)
    q, k, v = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen)
    cos, sin = make_rope_tables(max_position, head_dim, device=DEVICE)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen)
    positions[:3] = torch.tensor([0, max_position - 1, 5])
    positions = positions.to(pos_dtype).to(DEVICE)
    ref_q, ref_k = ref_rotary(q, positions, cos, sin), ref_rotary(k, positions, cos, sin)
    v_before = v.clone()

    apply_rotary(q, k, positions, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(q, ref_q) < tol and rel_err(k, ref_k) < tol
    assert torch.equal(v, v_before)  # the rest of the fused buffer is untouched


def test_apply_rotary_rejects_bad_inputs():
    q = torch.randn(4, 2, 32, device=DEVICE)
    cos, sin = make_rope_tables(16, 32, device=DEVICE)
    pos = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary(q, q.clone(), pos, cos.double(), sin)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, q.clone(), pos[:2], cos, sin)
    with pytest.raises(ValueError, match="one dtype"):
        apply_rotary(q, q.bfloat16(), pos, cos, sin)


# ---------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100) = inf, then gate / inf = -0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [100, 1500])
def test_silu_and_mul(dtype, intermediate):
    gen = _gen(13)
    num_tokens = 5 if not ON_GPU else 300
    x = (torch.randn(num_tokens, 2 * intermediate + 8, generator=gen) * 3)[:, :2 * intermediate]  # strided rows
    x[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0])  # silu saturates, no inf/NaN
    x = x.to(dtype).to(DEVICE)
    out = torch.full((num_tokens, intermediate), float("nan"), dtype=dtype, device=DEVICE)
    assert silu_and_mul(x, out) is out
    ref = ref_silu_and_mul(x)
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(out, ref) < tol
    assert rel_err(silu_and_mul(x), ref) < tol


def test_silu_and_mul_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), torch.empty(3, 8, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# skinny_gemm (a few rows against a large weight)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tuning", [None, SkinnyTuning(8, 64, 4, 1, use_dot=False),
                                    SkinnyTuning(16, 32, 4, 3, use_dot=True)], ids=["default", "sum", "dot"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_skinny_linear(dtype, tuning, rows):
    gen = _gen(17)
    n, k = (72, 256) if not ON_GPU else (4096 + 40, 4096)  # N not a multiple of the block: masked columns
    if tuning is not None and not tuning.use_dot and rows > 2:
        rows = 2  # the register-sum variant holds BLOCK_M x BLOCK_N x BLOCK_K products
    x = torch.randn(rows, k + 8, generator=gen)[:, :k].to(dtype).to(DEVICE)  # strided rows
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    assert skinny_linear(x, w, bias, tuning=tuning, out=out) is out
    assert rel_err(out, ref) < TOL[dtype]
    no_bias = skinny_linear(x, w, tuning=tuning)
    assert rel_err(no_bias, ref - bias.double()) < TOL[dtype]
    # each row alone gives the same bits as in the batch (no cross-row reduction)
    assert torch.equal(skinny_linear(x[rows - 1:], w, bias, tuning=tuning)[0], out[rows - 1])


def test_skinny_linear_rejects_bad_inputs():
    w = torch.randn(64, 256, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of"):
        skinny_linear(torch.randn(1, 200, device=DEVICE), torch.randn(64, 200, device=DEVICE))
    with pytest.raises(ValueError, match="1..16"):
        skinny_linear(torch.randn(17, 256, device=DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(torch.randn(1, 256, device=DEVICE), w, torch.randn(63, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        SkinnyTuning(24, 128, 4, 3, use_dot=True)


def test_skinny_linear_is_chosen_only_where_it_was_faster():
    """The H200 sweep's rule on Llama-3.1-8B's shapes: o_proj and the LM head at <= 16 rows, not the rest;
    never for tensors off a GPU (the CPU keeps its own kernels)."""
    assert faster_here(1, 4096, 4096) and faster_here(16, 128256, 4096)
    assert not faster_here(17, 4096, 4096) and not faster_here(1, 6144, 4096)
    assert not faster_here(1, 28672, 4096) and not faster_here(1, 4096, 14336)
    x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    assert wanted(x, w) == (x.is_cuda and ENABLED)


def test_kernel_modules_import_without_triton():
    """On a CPU-only install the modules import; a launch raises a RuntimeError naming Triton."""
    import subprocess

    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\n"
            "from kestrel.kernels.store_kv import store_kv\n"
            "k = torch.zeros(1, 1, 16)\n"
            "try:\n"
            "    store_kv(k, k, k, k, torch.zeros(1, dtype=torch.int32))\n"
            "except RuntimeError as e:\n"
            "    assert 'Triton' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
