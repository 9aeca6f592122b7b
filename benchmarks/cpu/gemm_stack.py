"""SmolLM2-135M's 30 layers of matmuls (qkv, o, gate_up, down) through the bf16 small-matmul kernel
(`kestrel/kernels/cpu_bf16_gemm.py`) and through F.linear (oneDNN, plain and
prepacked as `cpu_linear.PackedLinear` holds them), weights streamed from memory as a
decode step reads them; median of 5, milliseconds for all 120 calls.

    python benchmarks/cpu/gemm_stack.py [--rows 1 8 16 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kestrel.kernels import cpu_bf16_gemm, cpu_linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [N, K]: qkv, o_proj, gate_up, down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    args = ap.parse_args()
    if not cpu_bf16_gemm.use():
        raise SystemExit("the bf16 kernel does not run here (no AVX512-BF16)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layers = [[(torch.randn(n, k) * 0.02).bfloat16() for n, k in SHAPES] for _ in range(30)]
    packed = [[cpu_bf16_gemm.pack(w) for w in layer] for layer in layers]
    prepacked = [[torch.ops.mkldnn._reorder_linear_weight(w, cpu_linear._HINT_BATCH) for w in layer]
                 for layer in layers]
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for _, k in SHAPES}
        out = {}
        for name, fn in (("kernel", lambda x, i, j: cpu_bf16_gemm.linear(x, packed[i][j])),
                         ("oneDNN", lambda x, i, j: F.linear(x, layers[i][j])),
                         ("prepacked", lambda x, i, j: torch.ops.mkldnn._linear_pointwise(
                             x, prepacked[i][j], None, "none", [], ""))):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for i in range(30):
                    for j, (_, k) in enumerate(SHAPES):
                        fn(xs[k], i, j)
                times.append((time.perf_counter() - start) * 1e3)
            out[name] = statistics.median(times)
        print(f"{rows:3d} rows: kernel {out['kernel']:6.2f} ms, oneDNN {out['oneDNN']:6.2f} ms, oneDNN prepacked "
              f"(the engine's) {out['prepacked']:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
