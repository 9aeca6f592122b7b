"""Triton kernels of `kestrel/kernels/` against their plain-torch references (`tests/kernel_refs.py`).

Without a CUDA device the kernels run on CPU under the Triton interpreter, on tiny
shapes; with one, the same tests run on the GPU at somewhat larger shapes. Every
output is poisoned with NaN before the call, so an element a kernel fails to write
fails the test.
"""

from __future__ import annotations

import os
import sys

import torch

# The interpreter is chosen when a kernel is decorated, i.e. when its module is first imported,
# so this must come before anything imports triton or a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from kernel_refs import (  # noqa: E402
    make_kv_cache,
    ref_store_kv,
)

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
