"""The supervisor behind `kestrel serve`: spawn the three server processes, watch them, stop them.

    supervisor (this process, no torch, no HTTP)
      ├── api          FastAPI + uvicorn, tokenizer          (api_server.run_api_process)
      ├── detokenizer  token ids -> text, stop strings        (detokenizer_proc.run_detokenizer_process)
      └── engine       scheduler + worker                    (engine_proc.run_engine_process)

Processes are started with multiprocessing's "spawn" context (torch and fork do not mix) and talk
over ipc:// ZMQ sockets in a private temporary folder. Policy:
- a child dying before the engine is ready (bad model, port in use) stops the server (exit 1);
- after that, a dead engine or detokenizer is logged and reported to the API process, whose
  /health then answers 503; a dead API process stops the server (nothing could report it);
- SIGINT / SIGTERM stop every child (SIGTERM, then SIGKILL after a grace period) and exit 0.
Children also die with the supervisor (PR_SET_PDEATHSIG), so no process is left behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import shutil
import signal
import tempfile
from multiprocessing.process import BaseProcess

import zmq

from kestrel.config import EngineConfig
from kestrel.messages import ProcessDied, encode
from kestrel.server.api_server import run_api_process
from kestrel.server.config import IpcAddresses, ServerConfig
from kestrel.server.detokenizer_proc import run_detokenizer_process
from kestrel.server.engine_proc import run_engine_process

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0
"""How long a child may take to exit after SIGTERM before it is killed."""
_WATCH_INTERVAL_S = 0.5


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Run the server until a signal or a fatal child death; return the exit code."""
    folder = tempfile.mkdtemp(prefix="kestrel-")
    addrs = IpcAddresses.in_dir(folder)
    supervisor = Supervisor(engine_config, server_config, addrs)
    try:
        return supervisor.run()
    finally:
        supervisor.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


class Supervisor:
    """Owns the child processes: start, watch, report deaths, stop."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, addrs: IpcAddresses) -> None:
        ctx = mp.get_context("spawn")
        # The engine writes one message here once its model is loaded (a pipe: no semaphore to leak).
        self._ready_reader, ready_writer = ctx.Pipe(duplex=False)
        self._is_engine_ready = False
        level = server_config.log_level
        self._procs: dict[str, BaseProcess] = {
            "api": ctx.Process(target=run_api_process, args=(server_config, addrs), name="kestrel-api"),
            "detokenizer": ctx.Process(target=run_detokenizer_process,
                                       args=(server_config.tokenizer_path, addrs, level), name="kestrel-detokenizer"),
            "engine": ctx.Process(target=run_engine_process, args=(engine_config, addrs, ready_writer, level),
                                  name="kestrel-engine"),
        }
        self._addrs = addrs
        self._stop_requested = False
        self._reported: set[str] = set()
        self._zmq = zmq.Context()
        self._to_api = self._zmq.socket(zmq.PUSH)
        self._to_api.setsockopt(zmq.LINGER, 0)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for name, proc in self._procs.items():
                proc.start()
                logger.info("started the %s process (pid %d)", name, proc.pid)
            self._to_api.connect(self._addrs.api_inbox)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        if not self._stop_requested:
            logger.info("received %s: shutting down", signal.Signals(signum).name)
        self._stop_requested = True

    def _watch(self) -> int:
        """Wait for a signal or a child death; return the server's exit code."""
        while not self._stop_requested:
            waitables = [p.sentinel for n, p in self._procs.items() if n not in self._reported]
            if not self._is_engine_ready:
                waitables.append(self._ready_reader)
            mp.connection.wait(waitables, timeout=_WATCH_INTERVAL_S)
            self._poll_engine_ready()
            for name, proc in self._procs.items():
                if name in self._reported or proc.is_alive() or self._stop_requested:
                    continue
                self._reported.add(name)
                logger.error("the %s process (pid %d) died with exit code %s", name, proc.pid, proc.exitcode)
                if name == "api" or not self._is_engine_ready:
                    logger.error("stopping the server")
                    return 1
                self._to_api.send(encode(ProcessDied(name, proc.pid, proc.exitcode)))
                logger.error("/health now answers 503; restart the server to recover")
        return 0

    def _poll_engine_ready(self) -> None:
        if self._is_engine_ready:
            return
        try:
            if self._ready_reader.poll():
                self._ready_reader.recv()
                self._is_engine_ready = True
        except (EOFError, OSError):
            pass  # the engine died before it was ready: its sentinel reports it

    def stop_all(self) -> None:
        """Stop the children in order (API first, so no new work arrives), then force stragglers."""
        for name in ("api", "detokenizer", "engine"):
            proc = self._procs[name]
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
        for name in ("api", "detokenizer", "engine"):
            proc = self._procs[name]
            if proc.pid is None:
                continue
            proc.join(_STOP_GRACE_S)
            if proc.is_alive():
                logger.warning("the %s process did not stop in %.0f s; killing it", name, _STOP_GRACE_S)
                proc.kill()
                proc.join()
        self._zmq.destroy(linger=0)
        logger.info("all server processes stopped")
