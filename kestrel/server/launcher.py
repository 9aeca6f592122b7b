"""The supervisor behind `kestrel serve`: spawn the three server processes, watch them, stop them.

    supervisor (this process, no torch, no HTTP)
      ├── api          FastAPI + uvicorn, tokenizer          (api_server.run_api_process)
      ├── detokenizer  token ids -> text, stop strings        (detokenizer_proc.run_detokenizer_process)
      └── engine       scheduler + worker                    (engine_proc.run_engine_process)

Processes are started with multiprocessing's "spawn" context (torch and fork do not mix) and talk
over ipc:// ZMQ sockets in a private temporary folder; Prometheus multi-process files go to a
folder beside them (PROMETHEUS_MULTIPROC_DIR, unless the user set one). Policy:
- a child dying before the engine is ready (bad model, port in use) stops the server (exit 1);
- after that, a dead engine or detokenizer is reported to the API process (in-flight requests get
  an error, /health answers 503), then the server stops with exit status 1, or, with
  `--restart-engine`, a new engine and detokenizer start and the server serves again once the
  model is loaded; a dead API process stops the server (exit 1);
- SIGINT / SIGTERM drain: the API process stops accepting requests (503 + Retry-After) and lets
  those in flight finish for up to `--shutdown-timeout` seconds, then exits; the detokenizer and
  the engine are stopped after it, and the server exits 0. A second signal stops at once.
Children also die with the supervisor (PR_SET_PDEATHSIG), so no process is left behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess

import zmq

from kestrel.config import EngineConfig
from kestrel.messages import Drain, ProcessDied, encode
from kestrel.server.api_server import run_api_process
from kestrel.server.config import IpcAddresses, ServerConfig
from kestrel.server.detokenizer_proc import run_detokenizer_process
from kestrel.server.engine_proc import run_engine_process
from kestrel.server.metrics import MULTIPROC_ENV, forget_process

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0
"""How long a child may take to exit after SIGTERM before it is killed."""
_API_EXIT_GRACE_S = 10.0
"""How long the API process may take to exit after its drain deadline."""
_DEATH_LINGER_S = 2.0
"""After a fatal child death: how long /health answers 503 (and in-flight requests receive their
error) before the API process drains and the server exits."""
_WATCH_INTERVAL_S = 0.5
_PIPELINE = ("detokenizer", "engine")
"""The processes `--restart-engine` restarts together (the detokenizer holds the engine's requests)."""


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Run the server until a signal or a fatal child death; return the exit code."""
    folder = tempfile.mkdtemp(prefix="kestrel-")
    addrs = IpcAddresses.in_dir(folder)
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = os.path.join(folder, "metrics")
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)
    supervisor = Supervisor(engine_config, server_config, addrs)
    try:
        return supervisor.run()
    finally:
        supervisor.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


class Supervisor:
    """Owns the child processes: start, watch, report deaths, restart the engine, drain, stop."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, addrs: IpcAddresses) -> None:
        self._ctx = mp.get_context("spawn")
        self._engine_config = engine_config
        self._config = server_config
        self._addrs = addrs
        self._procs: dict[str, BaseProcess] = {}
        self._ready_reader = None
        """Read end of the pipe the current engine writes one message to once its model is loaded."""
        self._is_engine_ready = False
        self._num_restarts = 0
        self._num_signals = 0
        self._reported: set[int] = set()
        """Pids whose death was handled."""
        self._zmq = zmq.Context()
        self._to_api = self._zmq.socket(zmq.PUSH)
        self._to_api.setsockopt(zmq.LINGER, 0)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start("api")
            for name in _PIPELINE:
                self._start(name)
            self._to_api.connect(self._addrs.api_inbox)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, name: str) -> None:
        if name == "api":
            target, args = run_api_process, (self._config, self._addrs)
        elif name == "detokenizer":
            target, args = run_detokenizer_process, (self._config.tokenizer_path, self._addrs, self._config.log_level)
        else:
            self._ready_reader, ready_writer = self._ctx.Pipe(duplex=False)
            target, args = run_engine_process, (self._engine_config, self._config, self._addrs, ready_writer)
        proc = self._ctx.Process(target=target, args=args, name=f"kestrel-{name}")
        proc.start()
        self._procs[name] = proc
        logger.info("started the %s process (pid %d)", name, proc.pid)

    def _on_signal(self, signum: int, _frame) -> None:
        self._num_signals += 1
        if self._num_signals == 1:
            logger.info("received %s: draining (up to %.0f s; send it again to stop now)",
                        signal.Signals(signum).name, self._config.shutdown_timeout_s)
        elif self._num_signals == 2:
            logger.info("received %s again: stopping now", signal.Signals(signum).name)

    # ---- watching --------------------------------------------------------------
    def _watch(self) -> int:
        """Wait for a signal or a child death; return the server's exit code."""
        while not self._num_signals:
            waitables = [p.sentinel for p in self._procs.values() if p.pid not in self._reported]
            if not self._is_engine_ready and self._ready_reader is not None:
                waitables.append(self._ready_reader)
            mp.connection.wait(waitables, timeout=_WATCH_INTERVAL_S)
            self._poll_engine_ready()
            for name, proc in list(self._procs.items()):
                if proc.pid in self._reported or proc.is_alive() or self._num_signals:
                    continue
                code = self._on_death(name, proc)
                if code is not None:
                    return code
        return self._drain(self._config.shutdown_timeout_s, exit_code=0)

    def _poll_engine_ready(self) -> None:
        if self._is_engine_ready or self._ready_reader is None:
            return
        try:
            if self._ready_reader.poll():
                self._ready_reader.recv()
                self._is_engine_ready = True
        except (EOFError, OSError):
            pass  # the engine died before it was ready: its sentinel reports it

    def _on_death(self, name: str, proc: BaseProcess) -> int | None:
        """Handle one dead child: the exit code to stop with, or None when the server goes on."""
        self._reported.add(proc.pid)
        forget_process(proc.pid)
        logger.error("the %s process (pid %d) died with exit code %s", name, proc.pid, proc.exitcode)
        if name == "api" or not self._is_engine_ready:
            logger.error("stopping the server")
            return 1
        restart = self._config.restart_engine
        self._to_api.send(encode(ProcessDied(name, proc.pid, proc.exitcode, is_restarting=restart)))
        if not restart:
            logger.error("stopping the server (start it with --restart-engine to restart the engine instead)")
            deadline = time.monotonic() + _DEATH_LINGER_S
            while time.monotonic() < deadline and self._num_signals < 2:
                time.sleep(0.05)
            return self._drain(_DEATH_LINGER_S, exit_code=1)
        self._num_restarts += 1
        logger.warning("restarting the engine and detokenizer (restart %d); in-flight requests failed",
                       self._num_restarts)
        for other in _PIPELINE:
            self._stop(other)
        self._is_engine_ready = False
        for other in _PIPELINE:
            self._start(other)
        return None

    # ---- stopping --------------------------------------------------------------
    def _drain(self, timeout_s: float, exit_code: int) -> int:
        """Let the API process finish its requests (up to `timeout_s`) and exit; return `exit_code`."""
        api = self._procs["api"]
        if api.is_alive():
            self._to_api.send(encode(Drain(timeout_s)))
            deadline = time.monotonic() + timeout_s + _API_EXIT_GRACE_S
            signals_seen = self._num_signals
            while api.is_alive() and time.monotonic() < deadline and self._num_signals <= max(signals_seen, 1):
                self._report_pipeline_deaths()
                api.join(_WATCH_INTERVAL_S)
        return exit_code

    def _report_pipeline_deaths(self) -> None:
        """While draining, a dead engine or detokenizer fails what is in flight (no restart)."""
        for name in _PIPELINE:
            proc = self._procs[name]
            if proc.pid not in self._reported and not proc.is_alive():
                self._reported.add(proc.pid)
                forget_process(proc.pid)
                logger.error("the %s process (pid %d) died with exit code %s while draining",
                             name, proc.pid, proc.exitcode)
                self._to_api.send(encode(ProcessDied(name, proc.pid, proc.exitcode)))

    def _stop(self, name: str) -> None:
        """SIGTERM one child, wait, kill it if it does not go."""
        proc = self._procs.get(name)
        if proc is None or proc.pid is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(_STOP_GRACE_S)
        if proc.is_alive():
            logger.warning("the %s process did not stop in %.0f s; killing it", name, _STOP_GRACE_S)
            proc.kill()
            proc.join()
        if proc.pid not in self._reported:
            self._reported.add(proc.pid)
            forget_process(proc.pid)

    def stop_all(self) -> None:
        """Stop the children in order (API first, so no new work arrives), then force stragglers."""
        for name in ("api", *_PIPELINE):
            self._stop(name)
        self._zmq.destroy(linger=0)
        logger.info("all server processes stopped")
