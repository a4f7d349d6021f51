"""How the multiprocess executor names the cause when a rank fails (no model: stand-in processes).

When a rank's process exits, its peers' collectives fail at once, and a peer's error reply can reach
the engine before the exit does. The dead rank is the cause and must be what the request reports."""

import multiprocessing as mp

import pytest

from diffserve.engine import multiproc_executor
from diffserve.engine.multiproc_executor import MultiprocExecutor, WorkerDiedError

ctx = mp.get_context("fork")


def _peer_error_then_wait(conn):
    conn.send(("error", "RuntimeError", "gloo: Connection closed by peer", "traceback"))
    while conn.recv() is not None:  # until the executor shuts the group down
        pass


def _raise_then_wait(conn):
    conn.send(("error", "RuntimeError", "injected fault on rank 0", "traceback"))
    while conn.recv() is not None:
        pass


def _die(conn):
    raise SystemExit(137)


def _stuck_in_collective(conn):
    while conn.recv() is not None:
        pass


def _executor(*targets, keep_pipes_open=False) -> MultiprocExecutor:
    """An executor over processes running `targets` (rank order), each owing one reply.

    keep_pipes_open: this process keeps the workers' pipe ends, so a death shows only as the exit."""
    executor = object.__new__(MultiprocExecutor)
    executor.world_size, executor._healthy = len(targets), True
    executor.procs, executor.conns = [], []
    executor._held_pipe_ends = []
    for target in targets:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child,), daemon=True)
        proc.start()
        if keep_pipes_open:
            executor._held_pipe_ends.append(child)
        else:
            child.close()
        executor.procs.append(proc)
        executor.conns.append(parent)
    return executor


@pytest.mark.parametrize("keep_pipes_open", [False, True], ids=["seen_as_closed_pipe", "seen_as_exit"])
def test_a_dead_rank_is_reported_even_when_a_peer_error_arrives_first(keep_pipes_open):
    executor = _executor(_peer_error_then_wait, _die, keep_pipes_open=keep_pipes_open)
    executor.procs[1].join(10)
    assert executor.conns[0].poll(10)  # both events are in before the executor looks: the race's worst order
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 .*died with exit code 137; then rank 0: .*Connection closed"):
        executor._gather(timeout=30)
    assert not executor._healthy


def test_an_error_with_live_peers_is_the_error(monkeypatch):
    monkeypatch.setattr(multiproc_executor, "ERROR_GRACE_S", 3.0)
    executor = _executor(_raise_then_wait, _stuck_in_collective)
    with pytest.raises(Exception, match="injected fault on rank 0"):
        executor._gather(timeout=60)
    # The peer never answered: after the grace period the executor shut the group down.
    assert not any(p.is_alive() for p in executor.procs)
