"""Machine floors for the CPU figures: memory bandwidth, GEMM throughput, per-op dispatch cost.

    python benchmarks/cpu/probe.py [--threads 2] [--json out.json]

- copy / read bandwidth: `y.copy_(x)` and `x.sum()` over 1 GiB fp32 (bytes moved per second; copy
  counts read + write);
- GEMM: fp32 2048^3 through MKL (`a @ b`) and through oneDNN with a packed weight (what Kestrel's
  linear layers run), and the decode-shaped matmuls of SmolLM2-135M at 1 and 16 rows (ms per call
  and the weight bytes read per second);
- dispatch: one `torch.add` of two 576-float vectors (what a small op costs from Python);
- the load average before and after (the machine is shared: a busy one shows here).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from kestrel.kernels.cpu_linear import PackedLinear, packing_supported

from _emit import emit  # benchmarks/cpu/_emit.py (the script's folder is on sys.path)


def _time(fn, min_s: float = 0.5, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s and n >= 5:
            return elapsed / n


def _bandwidth() -> dict:
    x = torch.ones(256 * 1024 * 1024)  # 1 GiB
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    return {"copy_GBps_read_plus_write": round(2 * nbytes / _time(lambda: y.copy_(x)) / 1e9, 1),
            "read_GBps": round(nbytes / _time(lambda: x.sum()) / 1e9, 1)}


def _matmul(name: str, w: torch.Tensor) -> dict:
    out = {}
    packed = PackedLinear(w) if packing_supported(torch.float32, torch.device("cpu")) else None
    for rows in (1, 16):
        xs = torch.randn(rows, w.shape[1])
        kinds = {"mkl": lambda: F.linear(xs, w)}  # noqa: B023 (timed before the loop moves on)
        if packed is not None:
            kinds["onednn"] = lambda: packed(xs)  # noqa: B023
        for kind, fn in kinds.items():
            s = _time(fn, min_s=0.3)
            out[f"{name} x{rows} {kind}"] = {"ms": round(s * 1e3, 3), "weight_GBps": round(w.numel() * 4 / s / 1e9, 1)}
    return out


def probe() -> dict:
    out = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out.update(_bandwidth())
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flop = 2 * 2048 ** 3
    out["gemm_fp32_mkl_GFLOPs"] = round(flop / _time(lambda: a @ b) / 1e9, 1)
    if packing_supported(torch.float32, torch.device("cpu")):
        packed = PackedLinear(b.t().contiguous())
        out["gemm_fp32_onednn_packed_GFLOPs"] = round(flop / _time(lambda: packed(a)) / 1e9, 1)
    shapes = {"qkv 576->960": (960, 576), "o 576->576": (576, 576), "gate_up 576->3072": (3072, 576),
              "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}
    for name, (n_out, n_in) in shapes.items():
        out.update(_matmul(name, torch.randn(n_out, n_in)))
    u, v = torch.randn(576), torch.randn(576)
    out["small_op_us"] = round(_time(lambda: torch.add(u, v), min_s=0.3) * 1e6, 2)
    out["load_after"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = probe()
    emit(result, args.json)


if __name__ == "__main__":
    main()
