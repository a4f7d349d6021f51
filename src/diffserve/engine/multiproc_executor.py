"""One worker process per rank, driven from the engine process.

The engine spawns one process per rank of a replica (spawn start method; CUDA cannot be forked),
each joins the replica's torch.distributed group, builds its groups and its DiffusionWorker, and then
serves calls: the executor sends every call to every rank (SPMD) and returns rank 0's result. Each
data-parallel replica has its own executor, rendezvous port and devices (replica r of k ranks uses
local devices [r * k, (r + 1) * k)). Nothing may hang or outlive the engine:

- the executor watches every process while it waits; a dead worker fails the pending call at once
  and marks the executor unhealthy;
- a rank that errors while its peers do not answer within a grace period (stuck in a collective)
  is treated the same way;
- workers die with the engine process (PR_SET_PDEATHSIG on Linux, EOF on their pipe, and daemon
  processes), and shutdown() escalates from a polite stop to SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.errors import RequestAborted
from diffserve.engine.executor import Executor
from diffserve.request import DiffusionOutput

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0
# How long peers of a failed rank get to report before the group counts as wedged: a peer that has
# not answered by then waits in a collective the failed rank will never join.
ERROR_GRACE_S = 10.0
# A rank that dies this close to a peer's error is that error's cause: when a process exits, its
# peers' collectives fail at once, and their error replies can reach us before its exit does.
DEATH_IS_CAUSE_S = 2.0


class WorkerDiedError(RuntimeError):
    """A worker process exited or stopped answering; the executor can no longer serve."""


class RemoteError(Exception):
    def __init__(self, rank: int, exc_type: str, message: str, tb: str):
        super().__init__(f"rank {rank}: {exc_type}: {message}")
        self.rank, self.exc_type, self.message, self.tb = rank, exc_type, message, tb


_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()
# Spawning hides __main__ for a moment (_main_module_hidden); replicas start from several threads.
_spawn_lock = threading.Lock()


def get_free_port() -> int:
    """A port free now and not handed out before by this process: worker groups started at the same
    time (data-parallel replicas) must not pick the same rendezvous port in the moment before their
    rank 0 binds it."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


@contextlib.contextmanager
def _main_module_hidden():
    """Start spawned workers without re-importing the user's __main__ module.

    A spawned child normally re-runs the parent's main script, so a script without an
    `if __name__ == "__main__":` guard would build engines recursively. Workers need nothing from
    __main__ (their target and arguments live in diffserve), so it is hidden while they start.
    """
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for key in saved:
            if key == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, key)
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _error_reply(exc: BaseException) -> tuple:
    return ("error", type(exc).__name__, str(exc), traceback.format_exc())


def worker_main(
    od_config: OmniDiffusionConfig, rank: int, world_size: int, port: int, conn: Connection, abort_flag,
    first_device: int = 0,
) -> None:
    """Entry point of a spawned worker process: rank `rank` of a group of `world_size` (one replica),
    on local device `first_device + rank`."""
    _die_with_parent()
    from diffserve.logger import configure_logging

    configure_logging()
    local_rank = first_device + rank
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
         "LOCAL_RANK": str(local_rank)}
    )
    try:
        import torch

        from diffserve.engine.worker import DiffusionWorker, init_parallel_state

        if od_config.resolved_device.type == "cpu":
            # Every rank of every replica shares this machine's cores: oversubscribed threads slow
            # every rank (seen: 7x).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // od_config.parallel_config.world_size))

        init_parallel_state(od_config, rank, world_size, local_rank=local_rank)
        worker = DiffusionWorker(od_config, rank=rank, local_rank=local_rank, abort_flag=abort_flag)
    except BaseException as exc:  # report, then exit: the parent raises it
        conn.send(_error_reply(exc))
        return
    conn.send(("ok", None))
    serve_calls(worker, conn, rank)


def serve_calls(worker, conn: Connection, rank: int) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the engine is gone
            break
        if message is None:
            break
        method, args, want_progress = message
        if want_progress and rank == 0:
            # Rank 0 streams step progress to the engine ahead of its reply.
            args = (*args, lambda done, total: conn.send(("progress", done, total)))
        try:
            result = getattr(worker, method)(*args)
            # Only rank 0's outputs are returned; other ranks skip pickling theirs.
            conn.send(("ok", result if rank == 0 or method != "execute" else None))
        except Exception as exc:
            conn.send(_error_reply(exc))
    worker.close()


class MultiprocExecutor(Executor):
    """The worker processes of one replica (`replica`: its index under data parallelism)."""

    def __init__(self, od_config: OmniDiffusionConfig, replica: int = 0):
        pc = od_config.parallel_config
        self.world_size = pc.replica_world_size
        self.replica = replica
        first_device = replica * self.world_size
        device = od_config.resolved_device
        if device.type == "cuda":
            import torch

            available = torch.cuda.device_count()
            if available < pc.world_size:
                raise ValueError(
                    f"the parallel config needs {pc.world_size} GPUs (one per rank: {pc.data_parallel_size} "
                    f"replica(s) of {self.world_size}) but {available} are visible"
                )
        ctx = mp.get_context("spawn")
        port = get_free_port()
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        self._healthy = True
        # Shared with every worker: set to stop the running request at its next step (see
        # DiffusionWorker._on_step, where the ranks agree on it).
        self._abort = ctx.Value("b", 0, lock=False)
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(od_config, rank, self.world_size, port, child_conn, self._abort, first_device),
                name=f"diffserve-worker-{rank}" if pc.data_parallel_size == 1 else f"diffserve-r{replica}-w{rank}",
                daemon=True,
            )
            with _spawn_lock, _main_module_hidden():
                proc.start()
            child_conn.close()
            self.procs.append(proc)
            self.conns.append(parent_conn)
        # Shut the workers down at interpreter exit even if close() is never called.
        atexit.register(_shutdown_ref, weakref.ref(self))
        logger.info("replica %d: started %d worker processes (pids %s, port %d)", replica, self.world_size,
                    [p.pid for p in self.procs], port)
        try:
            self._gather(STARTUP_TIMEOUT_S)
        except RemoteError as exc:
            self.shutdown()
            raise _as_local_error(exc, "a worker failed to start") from None
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def collective_rpc(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        """Call `DiffusionWorker.<method>(*args)` on every rank; the results, by rank.

        With `progress`, rank 0 also reports (done, total) as the call goes (the worker method must
        take a progress callback as its last argument)."""
        if not self._healthy:
            raise WorkerDiedError("the worker processes are gone (a worker died or the executor was shut down)")
        for conn in self.conns:
            try:
                conn.send((method, args, progress is not None))
            except (BrokenPipeError, OSError) as exc:
                self._fail(f"cannot reach a worker: {exc}")
        try:
            return self._gather(timeout, progress)
        except RemoteError as exc:
            raise _as_local_error(exc, f"{method} failed") from None

    def _gather(self, timeout: float | None, progress: Callable[[int, int], None] | None = None) -> list[Any]:
        """Collect one reply per rank, watching for dead processes and wedged groups."""
        results: list[Any] = [None] * self.world_size
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        deadline = None if timeout is None else time.monotonic() + timeout
        first_error: RemoteError | None = None
        first_error_at = error_deadline = None
        while pending:
            limits = [t for t in (deadline, error_deadline) if t is not None]
            wait_s = max(0.0, min(limits) - time.monotonic()) if limits else None
            # Watch the pipes of ranks that owe a reply, and whether those ranks are still alive.
            sentinels = {self.procs[rank].sentinel: rank for rank in pending.values()}
            ready = wait(list(pending) + list(sentinels), timeout=wait_s)
            for item in ready:
                if item not in pending:
                    continue
                rank = pending[item]
                try:
                    reply = item.recv()
                except (EOFError, OSError):  # it died
                    self._fail_death(rank, first_error)
                if reply[0] == "progress":
                    _report_progress(progress, *reply[1:])
                    continue
                del pending[item]
                if reply[0] == "ok":
                    results[rank] = reply[1]
                elif first_error is None:
                    first_error = RemoteError(rank, *reply[1:])
                    first_error_at = time.monotonic()
                    error_deadline = first_error_at + ERROR_GRACE_S
            for item in ready:
                rank = sentinels.get(item)
                if rank is not None and rank in pending.values():
                    if first_error is not None and time.monotonic() > first_error_at + DEATH_IS_CAUSE_S:
                        continue  # a peer of the failed rank gave up after it
                    self._fail_death(rank, first_error)
            if first_error is not None and pending and (
                time.monotonic() >= error_deadline or all(not self.procs[r].is_alive() for r in pending.values())
            ):
                dead = [r for r in pending.values() if not self.procs[r].is_alive()]
                if dead and time.monotonic() <= first_error_at + DEATH_IS_CAUSE_S:
                    self._fail_death(dead[0], first_error)
                # The failed rank's peers are stuck in a collective (or gone): the group is unusable.
                logger.error("%s; the other ranks did not finish, shutting the workers down", first_error)
                self.shutdown()
                raise first_error
            if not ready and deadline is not None and time.monotonic() >= deadline:
                self._fail(f"the workers did not answer within {timeout:.0f} s")
        if first_error is not None:
            raise first_error
        return results

    def _fail_death(self, rank: int, peer_error: RemoteError | None) -> None:
        proc = self.procs[rank]
        proc.join(timeout=1.0)  # its pipe can close just before its exit code is in
        reason = f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}"
        if peer_error is not None:  # the peer's failure, most likely a consequence, in brief
            reason += "; then " + str(peer_error).splitlines()[0][:300]
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        logger.error("worker failure: %s; shutting the workers down", reason)
        self.shutdown()
        raise WorkerDiedError(reason)

    def execute(self, req, progress=None) -> DiffusionOutput:
        self._abort.value = 0
        return self.collective_rpc("execute", req, progress=progress)[0]

    def request_abort(self) -> None:
        self._abort.value = 1

    def start_profile(self, trace_dir: str) -> None:
        self.collective_rpc("start_profile", trace_dir)

    def stop_profile(self) -> list[str]:
        return self.collective_rpc("stop_profile")

    def is_healthy(self) -> bool:
        return self._healthy and all(p.is_alive() for p in self.procs)

    def kill(self) -> bool:
        # Only the processes: the thread blocked in _gather sees them die and fails the call cleanly.
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        return True

    def shutdown(self) -> None:
        self._healthy = False
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        for conn in self.conns:
            conn.close()
        self.conns = []


def _report_progress(callback: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if callback is None:
        return
    try:
        callback(done, total)
    except Exception:  # an observer's failure (e.g. a client gone) must not break the call
        logger.debug("progress callback failed", exc_info=True)


def _shutdown_ref(ref: "weakref.ref[MultiprocExecutor]") -> None:
    executor = ref()
    if executor is not None and executor.conns:
        executor.shutdown()


def _as_local_error(exc: RemoteError, what: str) -> Exception:
    """Re-raise a worker's error in the engine process, keeping invalid input a ValueError."""
    if exc.exc_type == "RequestAborted":
        return RequestAborted(exc.message)
    if exc.exc_type in ("ValueError", "ModelResolutionError", "WeightLoadingError"):
        return ValueError(f"{exc.message} (rank {exc.rank})")
    if exc.exc_type == "TypeError":
        return TypeError(f"{exc.message} (rank {exc.rank})")
    return RuntimeError(f"{what}: {exc}\n--- worker traceback ---\n{exc.tb}")
