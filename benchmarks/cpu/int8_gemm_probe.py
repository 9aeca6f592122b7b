"""Decode matmuls in int8 and on AMX tiles against oneDNN's bf16 packed ones, on SmolLM2's 30 layers of decode matmuls.

    python benchmarks/cpu/int8_gemm_probe.py [--rows 5 8 16 32] [--repeats 30]

Each layer has its own weights (q+k+v 960 x 576, o 576 x 576, gate+up 3072 x 576, down 576 x 1536), so
they stream from memory as in a decode step. Times the whole stack of 120 matmuls, median of `repeats`:
bf16 oneDNN packed (what decode steps of many rows use), and int8 weights with the activations quantized
per row (`onednn::qlinear_pointwise`, u8 activations with zero point 128; the row scales applied after),
with and without the quantization of x in the timing; torch's int4 weight-only kernel (what
`--cpu-quantized-decode` runs for a few rows); and, on a CPU with AMX, Kestrel's tile kernels
(`kernels/cpu_amx_gemm.py`, bf16 and int8, the quantization of x included). Also reports the int8
result's error against bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kestrel.kernels import cpu_amx_gemm, cpu_quant

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (u8 [rows, k] with zero point 128, fp32 scale [rows, 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = (xf / scale).round_().add_(128).clamp_(0, 255).to(torch.uint8)
    return q, scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[5, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers, amx_layers, int4_layers = [], [], []
    amx = cpu_amx_gemm.available()
    for _ in range(args.layers):
        for n, k in SHAPES:
            w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
            wf = w.float()
            w_scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [n]
            wq = (wf / w_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            qw = torch.ops.onednn.qlinear_prepack(wq, None)
            layers.append((n, k, packed, qw, w_scale, torch.zeros(n, dtype=torch.int64), w))
            if amx:
                amx_layers.append((cpu_amx_gemm.pack_bf16(w), cpu_amx_gemm.pack_int8(w)))
            int4_layers.append(cpu_quant.quantized_linear(cpu_quant.quantize_int4(w)))
    results = {"threads": torch.get_num_threads()}

    def bf16_stack(xs):
        for (_n, _k, packed, *_), x in zip(layers, xs):
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def int8_stack(xs, quantize=True, qxs=None):
        for i, ((_n, _k, _, qw, w_scale, w_zp, _w), x) in enumerate(zip(layers, xs)):
            if quantize:
                q, s = quantize_rows(x)
            else:
                q, s = qxs[i]
            out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, qw, w_scale, w_zp, None, 1.0, 0,
                                                     torch.float32, "none", [], "")
            out.mul_(s)

    def amx_stack(xs, int8):
        for (bf16, i8), x in zip(amx_layers, xs):
            cpu_amx_gemm.linear(x, i8 if int8 else bf16)

    def int4_stack(xs):
        for kernel, x in zip(int4_layers, xs):
            kernel(x)

    def timed(fn, *a, **kw):
        for _ in range(3):
            fn(*a, **kw)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(*a, **kw)
            times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 2)

    for rows in args.rows:
        xs = [torch.randn(rows, k).to(torch.bfloat16) for (n, k, *_) in layers]
        qxs = [quantize_rows(x) for x in xs]
        entry = {"bf16_onednn_ms": timed(bf16_stack, xs),
                 "int8_ms_incl_quant": timed(int8_stack, xs),
                 "int8_ms_matmul_only": timed(int8_stack, xs, False, qxs)}
        entry["int4_torch_ms"] = timed(int4_stack, xs)
        if amx:
            entry["amx_bf16_ms"] = timed(amx_stack, xs, False)
            entry["amx_int8_ms"] = timed(amx_stack, xs, True)
        n, k, packed, qw, w_scale, w_zp, w = layers[0]
        ref = xs[0].float() @ w.float().T
        q, s = qxs[0]
        got = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, qw, w_scale, w_zp, None, 1.0, 0, torch.float32,
                                                 "none", [], "") * s
        entry["int8_rel_err"] = round(float((got - ref).norm() / ref.norm()), 5)
        results[f"rows_{rows}"] = entry
        print(rows, entry, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
