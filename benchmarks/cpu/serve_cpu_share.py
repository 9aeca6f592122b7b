"""CPU time of each server process (and the client) during one `kestrel bench serve` run.

    python benchmarks/cpu/serve_cpu_share.py --port 8011 [--server-args "--compile-decode"] \
        [--bench-args "--max-concurrency 16 --num-prompts 32"]

Starts `kestrel serve` on the bundled model, waits for /health, reads every process's user+system
CPU seconds from /proc (the supervisor and its children: API server, engine, detokenizer), runs
the benchmark client (128 in / 128 out, greedy, ignore EOS, /v1/completions), reads them again,
and prints each process's share of the run's wall time (2 cores = 200%). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def names(server_pid: int, pids: list[int]) -> dict[int, str]:
    """The launcher starts api, detokenizer, engine in that order (multiprocessing spawn children)."""
    out = {server_pid: "supervisor"}
    spawned = sorted(pid for pid in pids if "spawn_main" in cmdline(pid))
    out.update(zip(spawned, ("api", "detokenizer", "engine")))
    for pid in pids:
        out.setdefault(pid, f"other[{pid}]")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--server-args", default="")
    p.add_argument("--bench-args", default="--max-concurrency 16 --num-prompts 32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", "--port", str(args.port),
                               "--disable-uvicorn-access-log", *shlex.split(args.server_args)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not come up")
            time.sleep(1)
        pids = [server.pid, *children(server.pid)]
        before = {pid: cpu_seconds(pid) for pid in pids}
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        client = subprocess.run([sys.executable, "-m", "kestrel.cli", "bench", "serve", "--base-url", url,
                                 "--endpoint", "/v1/completions", "--random-input-len", "128",
                                 "--random-output-len", "128", "--temperature", "0", "--ignore-eos",
                                 *shlex.split(args.bench_args)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        usage = os.times()
        label = names(server.pid, pids)
        shares = {label[pid]: round(100 * (cpu_seconds(pid) - before[pid]) / wall, 1) for pid in pids}
        shares["client"] = round(100 * (usage.children_user + usage.children_system) / wall, 1)
        result = {"server_args": args.server_args, "bench_args": args.bench_args, "wall_s": round(wall, 2),
                  "cpu_percent_of_wall": shares, "load_before": load_before, "load_after": os.getloadavg()[0],
                  "client_output": client.stdout[-1500:]}
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
