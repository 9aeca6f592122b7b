"""Check and time the Triton kernels of `kestrel/kernels/` at Llama-3.1-8B sizes.

    python benchmarks/gpu/kernels_check.py [--out results.json]   # on a GPU, bf16
    python benchmarks/gpu/kernels_check.py --tiny                  # tiny sizes; on CPU under the interpreter

Each case runs the kernel once on fresh random inputs and compares it with the
plain-torch reference of `tests/kernel_refs.py` (relative error ||out - ref|| / ||ref||),
then times it with `triton.testing.do_bench` (median; on CPU a plain wall-clock median,
which only shows that the script runs). Bandwidth is counted over the bytes a kernel
must move at least (each input read once, each output written once); extend attention
also reports TFLOP/s over its causal FLOPs (4 * head_dim per visible query-key pair
and head). Prints one table; `--out` writes it as JSON too. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [_REPO, os.path.join(_REPO, "tests")]
if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import kernel_refs as refs  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from kestrel.kernels.decode_attention import decode_attention, decode_workspace_size  # noqa: E402
from kestrel.kernels.extend_attention import extend_attention  # noqa: E402
from kestrel.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from kestrel.kernels.rotary import apply_rotary  # noqa: E402
from kestrel.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from kestrel.kernels.skinny_gemm import skinny_linear  # noqa: E402
from kestrel.kernels.store_kv import store_kv  # noqa: E402


@dataclass(frozen=True, slots=True)
class Model:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int


LLAMA_8B = Model(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336)
TINY = Model(hidden=64, num_heads=4, num_kv_heads=1, head_dim=32, intermediate=96)


@dataclass(slots=True)
class Result:
    kernel: str
    case: str
    rel_err: float
    tol: float
    ok: bool
    median_us: float
    gb_per_s: float
    tflop_per_s: float | None = None


class Bench:
    """Runs the cases on one device and collects their results."""

    def __init__(self, device: torch.device, dtype: torch.dtype, tiny: bool) -> None:
        self.device, self.dtype, self.tiny = device, dtype, tiny
        self.tol = 1e-4 if dtype == torch.float32 else 2e-2
        self.gen = torch.Generator().manual_seed(0)
        self.results: list[Result] = []

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        if self.device.type == "cuda":
            return (torch.randn(shape, device=self.device) * scale).to(self.dtype)
        return (torch.randn(shape, generator=self.gen) * scale).to(self.dtype)

    def time_us(self, fn) -> float:
        if self.device.type == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    def record(self, kernel: str, case: str, err: float, fn, num_bytes: float, flops: float | None = None) -> None:
        us = self.time_us(fn)
        self.results.append(Result(kernel, case, err, self.tol, err < self.tol, us, num_bytes / us / 1e3,
                                   flops / us / 1e6 if flops is not None else None))

    def kv_batch(self, m: Model, seq_lens: list[int]):
        """Caches holding every position of `seq_lens` at scrambled slots, and the slot table."""
        num_slots = sum(seq_lens) + 1024
        gen = self.gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(1)
        k_cache, v_cache = refs.make_kv_cache(num_slots, m.num_kv_heads, m.head_dim, self.dtype, self.device, gen)
        req_to_token, req_rows = refs.make_req_to_token(seq_lens, num_slots, max(seq_lens) + 16, self.device,
                                                        self.gen)
        return k_cache, v_cache, req_to_token, req_rows

    def decode_case(self, m: Model, batch: int, seq_len: int):
        """`batch` requests of ~seq_len keys (+-1/16).

        Returns (q, k_cache, v_cache, req_to_token, req_rows, seq_lens, seq_lens_t)."""
        jitter = max(1, seq_len // 16)
        offsets = torch.randint(-jitter, jitter + 1, (batch,), generator=self.gen)
        seq_lens = [max(1, seq_len + int(x)) for x in offsets]
        k_cache, v_cache, req_to_token, req_rows = self.kv_batch(m, seq_lens)
        q, _, _ = self.qkv(m, batch)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=self.device)
        return q, k_cache, v_cache, req_to_token, req_rows, seq_lens, seq_lens_t

    def workspace(self, m: Model, batch: int, num_kv_splits: int) -> torch.Tensor:
        return torch.empty(decode_workspace_size(batch, m.num_heads, m.head_dim, num_kv_splits),
                           dtype=torch.float32, device=self.device)

    def extend_case(self, m: Model, cases: list[tuple[int, int]]):
        """cases: (cached prefix, new tokens) per request -> (q, k_cache, v_cache, req_to_token, req_rows,
        q_start_loc, seq_lens, seq_lens_t, causal FLOPs)."""
        q_lens = [q_len for _, q_len in cases]
        seq_lens = [prefix + q_len for prefix, q_len in cases]
        k_cache, v_cache, req_to_token, req_rows = self.kv_batch(m, seq_lens)
        q, _, _ = self.qkv(m, sum(q_lens))
        q_start_loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(self.device)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=self.device)
        # Query at position p sees p + 1 keys; positions of request r run over [prefix, prefix + q_len).
        pairs = sum(q_len * prefix + q_len * (q_len + 1) // 2 for prefix, q_len in cases)
        return (q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, seq_lens_t,
                4 * m.head_dim * m.num_heads * pairs)

    def qkv(self, m: Model, num_tokens: int):
        qkv = self.randn(num_tokens, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim)
        q, k, v = qkv.split([m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim,
                             m.num_kv_heads * m.head_dim], dim=-1)
        return (q.view(num_tokens, m.num_heads, m.head_dim), k.view(num_tokens, m.num_kv_heads, m.head_dim),
                v.view(num_tokens, m.num_kv_heads, m.head_dim))


def bench_store_kv(b: Bench, m: Model, num_tokens: int) -> None:
    _, k, v = b.qkv(m, num_tokens)
    num_slots = 4 * num_tokens + 64
    k_cache, v_cache = b.randn(num_slots, m.num_kv_heads, m.head_dim), b.randn(num_slots, m.num_kv_heads, m.head_dim)
    slot_mapping = torch.randperm(num_slots, generator=b.gen)[:num_tokens].to(torch.int32)
    slot_mapping[-1] = -1  # one padding token
    slot_mapping = slot_mapping.to(b.device)
    ref_k, ref_v = refs.ref_store_kv(k, v, k_cache, v_cache, slot_mapping)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    err = max(refs.rel_err(k_cache, ref_k), refs.rel_err(v_cache, ref_v))
    num_bytes = 2 * 2 * k.numel() * k.element_size() + slot_mapping.numel() * 4
    b.record("store_kv", f"T={num_tokens}", err, lambda: store_kv(k, v, k_cache, v_cache, slot_mapping), num_bytes)


def bench_decode(b: Bench, m: Model, batch: int, seq_len: int, num_kv_splits: int) -> None:
    q, k_cache, v_cache, req_to_token, req_rows, seq_lens, seq_lens_t = b.decode_case(m, batch, seq_len)
    out = torch.full(q.shape, float("nan"), dtype=b.dtype, device=b.device)
    workspace = b.workspace(m, batch, num_kv_splits)
    scale = m.head_dim ** -0.5

    def run():
        decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, out, scale, num_kv_splits,
                         workspace)

    run()
    ref = refs.ref_decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, scale)
    err = refs.rel_err(out, ref)
    kv_bytes = 2 * sum(seq_lens) * m.num_kv_heads * m.head_dim * k_cache.element_size()
    num_bytes = kv_bytes + sum(seq_lens) * 4 + 2 * q.numel() * q.element_size() + 2 * workspace.numel() * 4
    b.record("decode_attention", f"B={batch} seq~{seq_len} splits={num_kv_splits}", err, run, num_bytes)


def check_decode_cuda_graph(b: Bench, m: Model) -> None:
    """Capture decode once, then replay it with other seq_lens (one of them 0): still right."""
    batch, num_kv_splits = 8, 8
    seq_lens = [300, 1, 0, 2000, 777, 64, 129, 1500]
    k_cache, v_cache, req_to_token, req_rows = b.kv_batch(m, [2100] * batch)
    q, _, _ = b.qkv(m, batch)
    seq_lens_t = torch.full((batch,), 5, dtype=torch.int32, device=b.device)
    out = torch.empty(q.shape, dtype=b.dtype, device=b.device)
    workspace = b.workspace(m, batch, num_kv_splits)
    scale = m.head_dim ** -0.5

    def run():
        decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, out, scale, num_kv_splits,
                         workspace)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    seq_lens_t.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = refs.ref_decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, scale)
    err = refs.rel_err(out, ref)
    kv_bytes = 2 * sum(seq_lens) * m.num_kv_heads * m.head_dim * k_cache.element_size()
    b.record("decode_attention", f"CUDA graph replay B={batch} mixed seq", err, graph.replay, kv_bytes)


def bench_extend(b: Bench, m: Model, cases: list[tuple[int, int]], label: str) -> None:
    """cases: (cached prefix, new tokens) per request."""
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, seq_lens_t, flops = b.extend_case(m, cases)
    q_lens = [q_len for _, q_len in cases]
    out = torch.full(q.shape, float("nan"), dtype=b.dtype, device=b.device)
    scale = m.head_dim ** -0.5

    def run():
        extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens_t, out, scale,
                         max(q_lens))

    run()
    ref = refs.ref_extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens_t, scale)
    err = refs.rel_err(out, ref)
    kv_bytes = 2 * sum(seq_lens) * m.num_kv_heads * m.head_dim * k_cache.element_size()
    num_bytes = kv_bytes + 2 * q.numel() * q.element_size() + sum(seq_lens) * 4
    b.record("extend_attention", label, err, run, num_bytes, flops)


def bench_rms_norm(b: Bench, m: Model, num_tokens: int) -> None:
    x, residual = b.randn(num_tokens, m.hidden, scale=3.0), b.randn(num_tokens, m.hidden)
    weight = (1 + 0.1 * torch.randn(m.hidden)).to(b.dtype).to(b.device)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, weight, 1e-5, out)
    err = refs.rel_err(out, refs.ref_rms_norm(x, weight, 1e-5))
    size = x.numel() * x.element_size()
    b.record("rms_norm", f"T={num_tokens} N={m.hidden}", err, lambda: rms_norm(x, weight, 1e-5, out), 2 * size)

    ref_out, ref_residual = refs.ref_fused_add_rms_norm(x, residual, weight, 1e-5)
    fused_add_rms_norm(x, residual, weight, 1e-5)
    err = max(refs.rel_err(x, ref_out), refs.rel_err(residual, ref_residual))
    b.record("fused_add_rms_norm", f"T={num_tokens} N={m.hidden}", err,
             lambda: fused_add_rms_norm(x, residual, weight, 1e-5), 4 * size)


def bench_rotary(b: Bench, m: Model, num_tokens: int) -> None:
    q, k, _ = b.qkv(m, num_tokens)
    max_position = 8192 if not b.tiny else 256
    cos, sin = refs.make_rope_tables(max_position, m.head_dim, device=b.device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=b.gen).to(b.device)
    ref_q, ref_k = refs.ref_rotary(q, positions, cos, sin), refs.ref_rotary(k, positions, cos, sin)
    apply_rotary(q, k, positions, cos, sin)
    err = max(refs.rel_err(q, ref_q), refs.rel_err(k, ref_k))
    num_bytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * num_tokens * (m.head_dim // 2) * 4
    b.record("apply_rotary", f"T={num_tokens} H={m.num_heads} KH={m.num_kv_heads}", err,
             lambda: apply_rotary(q, k, positions, cos, sin), num_bytes)


def bench_silu_and_mul(b: Bench, m: Model, num_tokens: int) -> None:
    x = b.randn(num_tokens, 2 * m.intermediate, scale=3.0)
    out = torch.full((num_tokens, m.intermediate), float("nan"), dtype=b.dtype, device=b.device)
    silu_and_mul(x, out)
    err = refs.rel_err(out, refs.ref_silu_and_mul(x))
    num_bytes = (x.numel() + out.numel()) * x.element_size()
    b.record("silu_and_mul", f"T={num_tokens} I={m.intermediate}", err, lambda: silu_and_mul(x, out), num_bytes)


def bench_skinny(b: Bench, rows: int, n: int, k: int, label: str) -> None:
    """A few rows against a weight (o_proj, LM head at decode); do_bench re-reads one weight, so L2 may
    serve part of a small one: gemv_probe.py times 32 distinct weights instead."""
    x, w = b.randn(rows, k), b.randn(n, k, scale=k ** -0.5)
    out = skinny_linear(x, w)
    err = refs.rel_err(out, torch.nn.functional.linear(x.float(), w.float()))
    b.record("skinny_linear", f"{label} M={rows} N={n} K={k}", err, lambda: skinny_linear(x, w, out=out),
             w.numel() * w.element_size(), 2 * rows * n * k)


def run_all(b: Bench) -> None:
    m = TINY if b.tiny else LLAMA_8B
    tokens = [3, 40] if b.tiny else [64, 2048]
    for t in tokens:
        bench_store_kv(b, m, t)
    decode_cases = ([(1, 20, 2), (3, 70, 2)] if b.tiny else
                    [(1, 640, 16), (1, 4096, 32), (64, 640, 4), (64, 4096, 8), (64, 4096, 2)])
    for batch, seq_len, splits in decode_cases:
        bench_decode(b, m, batch, seq_len, splits)
    if b.device.type == "cuda":
        check_decode_cuda_graph(b, m)
    if b.tiny:
        bench_extend(b, m, [(0, 40), (0, 40)], "2 prompts x 40")
        bench_extend(b, m, [(32, 16)] * 2, "2 chunks of 16 after 32 cached")
    else:
        bench_extend(b, m, [(0, 2048)], "1 prompt x 2048")
        bench_extend(b, m, [(0, 2048)] * 4, "4 prompts x 2048")
        bench_extend(b, m, [(1024, 128)] * 16, "16 chunks of 128 after 1024 cached")
        bench_extend(b, m, [(1024, 128)] + [(640, 1)] * 31, "1 chunk + 31 decodes (q_len 1)")
    for rows in (1, 16):
        if b.tiny:
            bench_skinny(b, rows, 72, 256, "tiny")
        else:
            bench_skinny(b, rows, m.hidden, m.hidden, "o_proj")
            bench_skinny(b, rows, 128256, m.hidden, "lm_head")
    for t in tokens:
        bench_rms_norm(b, m, t)
        bench_rotary(b, m, t)
        bench_silu_and_mul(b, m, t)


def print_table(results: list[Result]) -> None:
    header = f"{'kernel':<20} {'case':<40} {'rel_err':>9} {'ok':>4} {'median_us':>10} {'GB/s':>8} {'TFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        tflops = f"{r.tflop_per_s:8.1f}" if r.tflop_per_s is not None else f"{'':>8}"
        print(f"{r.kernel:<20} {r.case:<40} {r.rel_err:9.2e} {'yes' if r.ok else 'NO':>4} {r.median_us:10.1f} "
              f"{r.gb_per_s:8.1f} {tflops}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (runs on CPU under the Triton interpreter)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: only --tiny runs on CPU (under the Triton interpreter)")
    torch.manual_seed(0)
    bench = Bench(device, getattr(torch, args.dtype), args.tiny)
    run_all(bench)
    print_table(bench.results)
    if args.out:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype, "tiny": args.tiny,
                "results": [{k: v if not isinstance(v, float) or math.isfinite(v) else None
                             for k, v in asdict(r).items()} for r in bench.results]}
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    return 0 if all(r.ok for r in bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
