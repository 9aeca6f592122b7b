"""Soak run: `kestrel serve` under Poisson arrivals at a fraction of its measured capacity.

    python benchmarks/soak.py [--minutes 10] [--load 0.8] [--input-len 128] [--output-len 64] \
        [--max-num-seqs 16] [--out benchmarks/soak]

1. Starts `kestrel serve` (the bundled SmolLM2-135M-Instruct, its defaults otherwise).
2. Capacity: `--capacity-prompts` streaming requests, `--max-num-seqs` in flight at once (the
   server's batch always full); capacity = completed requests / elapsed seconds.
3. Soak: Poisson arrivals at `--load` x capacity for `--minutes` (requests = rate x seconds), with
   the RSS of every server process sampled every `--rss-interval` seconds.
4. Writes soak.json (every figure, the per-window TTFT, the RSS series, the failures, what else ran
   on the machine) and soak.png (TTFT p50/p99 per window; RSS per process), then stops the server
   with SIGTERM and records its exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

from kestrel.bench import serve
from kestrel.frontend.tokenizer import load_tokenizer
from kestrel.model_files import default_model_path

_WINDOW_S = 30.0


def main() -> int:
    args = _parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    tokenizer = load_tokenizer(default_model_path())
    port = _free_port()
    log_path = os.path.join(args.out, "server.log")
    server = _start_server(port, args.max_num_seqs, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        capacity = _capacity(url, tokenizer, args)
        rate = args.load * capacity
        num = max(1, round(rate * args.minutes * 60))
        print(f"capacity {capacity:.3f} req/s; soak at {rate:.3f} req/s ({args.load:.0%}), {num} requests")
        pids = _server_pids(server.pid, log_path)
        sampler = _RssSampler(pids, args.rss_interval)
        sampler.start()
        others = _other_processes(server.pid)
        prompts = serve.random_prompts(tokenizer, num, args.input_len, args.output_len, seed=1)
        spec = serve.ServeSpec(base_url=url, request_rate=rate, num_warmups=0, seed=1, request_timeout_s=600)
        results, duration, _ = asyncio.run(serve.run_serve(spec, prompts))
        sampler.stop()
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    record = _record(args, capacity, rate, results, duration, sampler, others, exit_code)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(record, f, indent=2)
    _plot(record, os.path.join(args.out, "soak.png"))
    print(json.dumps(record["summary"], indent=2))
    return 0 if record["summary"]["failed"] == 0 else 1


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--capacity-prompts", type=int, default=96)
    p.add_argument("--rss-interval", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak"))
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, max_num_seqs: int, log_path: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", "--port", str(port),
                                 "--max-num-seqs", str(max_num_seqs), "--disable-uvicorn-access-log",
                                 "--log-stats-interval", "30"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"kestrel serve exited with {proc.returncode}; see {log_path}")
        time.sleep(0.5)
    raise RuntimeError("kestrel serve did not become healthy")


def _capacity(url: str, tokenizer, args) -> float:
    prompts = serve.random_prompts(tokenizer, args.capacity_prompts, args.input_len, args.output_len, seed=0)
    spec = serve.ServeSpec(base_url=url, max_concurrency=args.max_num_seqs, num_warmups=2, seed=0)
    results, duration, _ = asyncio.run(serve.run_serve(spec, prompts))
    return sum(r.success for r in results) / duration


def _server_pids(supervisor: int, log_path: str) -> dict[str, int]:
    """The supervisor and its children, by name (from the supervisor's "started the X process" lines)."""
    with open(log_path) as f:
        started = dict(re.findall(r"started the (\w+) process \(pid (\d+)\)", f.read()))
    return {"supervisor": supervisor, **{name: int(pid) for name, pid in started.items()}}


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024
    except (OSError, StopIteration):
        return None


class _RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval_s = pids, interval_s
        self.samples: list[dict] = []
        self._done = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append({"t_s": time.monotonic() - self._start,
                                 **{name: _rss_mb(pid) for name, pid in self.pids.items()}})
            if self._done.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.samples.append({"t_s": time.monotonic() - self._start,
                             **{name: _rss_mb(pid) for name, pid in self.pids.items()}})


def _other_processes(server_pid: int) -> list[str]:
    """What else used the CPU when the soak began (top 10 by CPU, the server's own excluded)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True)
    lines = out.stdout.splitlines()[1:]
    mine = {str(server_pid), str(os.getpid())}
    return [line[:160] for line in lines if line.split()[0] not in mine and line.split()[1] not in mine][:10]


def _record(args, capacity, rate, results, duration, sampler, others, exit_code) -> dict:
    windows = []
    for start in np.arange(0, args.minutes * 60, _WINDOW_S):
        ttfts = [r.ttft for r in results if r.success and start <= r.start < start + _WINDOW_S]
        windows.append({"start_s": float(start), "num_requests": len(ttfts),
                        "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
                        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None})
    ok = [r for r in results if r.success]
    first, last = sampler.samples[0], sampler.samples[-1]
    names = [n for n in sampler.pids if first.get(n) and last.get(n)]
    total_start, total_end = sum(first[n] for n in names), sum(last[n] for n in names)
    ttfts = [r.ttft for r in ok]
    summary = {
        "capacity_req_per_s": capacity, "rate_req_per_s": rate, "load": args.load, "duration_s": duration,
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p99_s": float(np.percentile(ttfts, 99)),
        "output_tokens_per_s": sum(r.output_len for r in ok) / duration,
        "rss_mb_start": {n: first[n] for n in names}, "rss_mb_end": {n: last[n] for n in names},
        "rss_mb_total_start": total_start, "rss_mb_total_end": total_end,
        "rss_growth_pct": 100 * (total_end - total_start) / total_start,
        "server_exit_code": exit_code,
    }
    return {"summary": summary, "config": vars(args), "windows": windows, "rss_samples": sampler.samples,
            "errors": sorted({r.error for r in results if r.error})[:20], "other_processes_at_start": others,
            "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["summary"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    w = [x for x in record["windows"] if x["num_requests"]]
    minutes = [(x["start_s"] + _WINDOW_S / 2) / 60 for x in w]
    top.plot(minutes, [x["ttft_p50_s"] for x in w], marker="o", label="p50")
    top.plot(minutes, [x["ttft_p99_s"] for x in w], marker="o", label="p99")
    top.set_ylabel(f"TTFT (s), {_WINDOW_S:.0f}-s windows")
    top.set_title(f"Kestrel soak: {s['rate_req_per_s']:.2f} req/s Poisson ({s['load']:.0%} of "
                  f"{s['capacity_req_per_s']:.2f}), {s['completed']} done, {s['failed']} failed")
    top.legend()
    top.grid(alpha=0.3)
    for name in s["rss_mb_start"]:
        pts = [(x["t_s"] / 60, x[name]) for x in record["rss_samples"] if x.get(name)]
        bottom.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    bottom.set_ylabel("RSS (MB)")
    bottom.set_xlabel("minutes")
    bottom.set_title(f"RSS of the server processes: {s['rss_mb_total_start']:.0f} -> "
                     f"{s['rss_mb_total_end']:.0f} MB ({s['rss_growth_pct']:+.1f}%)")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
