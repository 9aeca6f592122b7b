"""Executors: how the engine reaches its worker(s). Same three calls whichever kind.

- `uni`: the worker runs in the engine's process (the default).
- `mp`: the worker runs in a child process; each `StepBatch` crosses the process boundary as
  msgpack bytes over a pipe and the `StepResult` comes back the same way. This is the path tensor
  parallelism takes (one child per rank, each receiving the same batch).

Contract: `submit(batch)` queues a step and returns a handle whose `result()` gives the step's
result or raises RuntimeError (the worker's error, or its death); results come back in submission
order; `execute` is `submit(...).result()`; `shutdown` is idempotent.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Protocol

from kestrel.config import EngineConfig, ModelConfig
from kestrel.step_batch import StepBatch, StepResult, decode_batch, decode_result, encode
from kestrel.worker.worker import Worker, WorkerInfo

_RESULT, _ERROR = b"r", b"e"
"""First byte of every message from a worker process."""


class PendingResult(Protocol):
    def result(self) -> StepResult:
        ...


class Executor(Protocol):
    info: WorkerInfo

    def submit(self, batch: StepBatch) -> PendingResult:
        ...

    def execute(self, batch: StepBatch) -> StepResult:
        ...

    def shutdown(self) -> None:
        ...


def create_executor(config: EngineConfig, model_path: str, model_config: ModelConfig) -> Executor:
    if config.distributed_executor_backend == "mp":
        return MultiprocExecutor(config, model_path, model_config)
    return UniprocExecutor(config, model_path, model_config)


class UniprocExecutor:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig) -> None:
        self.worker = Worker(config, model_path, model_config)
        self.info = self.worker.info

    def submit(self, batch: StepBatch) -> PendingResult:
        return self.worker.submit(batch)

    def execute(self, batch: StepBatch) -> StepResult:
        return self.worker.execute(batch)

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_worker_main, args=(config, model_path, model_config, child_conn),
                                    name="kestrel-worker", daemon=True)
        self._process.start()
        child_conn.close()
        self.info: WorkerInfo = self._receive_info()

    def submit(self, batch: StepBatch) -> PendingResult:
        """Send the batch; the child computes it while the engine builds the next one."""
        try:
            self._conn.send_bytes(encode(batch))
        except OSError as e:
            raise RuntimeError(f"the worker process died (exit code {self._process.exitcode})") from e
        return _Reply(self)

    def execute(self, batch: StepBatch) -> StepResult:
        return self.submit(batch).result()

    def _receive(self) -> StepResult:
        try:
            reply = self._conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"the worker process died (exit code {self._process.exitcode})") from e
        if reply[:1] == _ERROR:
            raise RuntimeError(f"the worker failed: {reply[1:].decode()}")
        return decode_result(reply[1:])

    def shutdown(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send_bytes(b"")
            except OSError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    def _receive_info(self) -> WorkerInfo:
        try:
            info = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the worker process died while loading (exit code {self._process.exitcode})") from None
        if isinstance(info, str):
            self._process.join()
            raise RuntimeError(f"the worker could not start: {info}")
        return info


class _Reply:
    """The child's reply to one submitted batch (replies arrive in submission order)."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self._executor = executor

    def result(self) -> StepResult:
        return self._executor._receive()


def _worker_main(config: EngineConfig, model_path: str, model_config: ModelConfig, conn) -> None:
    """Child process: build the worker, report its info, then execute batches until told to stop."""
    try:
        worker = Worker(config, model_path, model_config)
    except Exception:
        conn.send(traceback.format_exc())
        return
    conn.send(worker.info)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the engine is gone
            return
        if not data:
            return
        try:
            conn.send_bytes(_RESULT + encode(worker.execute(decode_batch(data))))
        except Exception as e:
            conn.send_bytes(_ERROR + f"{type(e).__name__}: {e}".encode())
