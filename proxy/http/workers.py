"""``promptcache proxy --workers N``: N proxy processes on one port, so one pod uses its cores.

Each worker is a whole proxy (its own event loop, pools, tokenizers and ledger spool) listening with
``SO_REUSEPORT``, so the kernel spreads connections between them. The parent only supervises: SIGTERM
or SIGINT is passed on (each worker drains as a single proxy does), and when a worker exits on its own
the others are stopped and the parent exits with its status, so the container restarts whole (the
spools are on disk); a supervisor killed outright takes its workers with it (``PR_SET_PDEATHSIG``).
Metrics are aggregated over the workers with prometheus-client's multiprocess mode, so ``/metrics`` on
any worker reports the pod.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

from prometheus_client import multiprocess

_log = logging.getLogger("promptcache.workers")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1


def supervise(workers: int, target: Callable[..., int], *args: Any) -> int:
    """Run ``target(*args, index)`` in ``workers`` spawned processes until they stop; returns the exit status."""
    directory = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="promptcache-metrics-")
    shutil.rmtree(directory, ignore_errors=True)  # counters of an earlier run would be added to this one's
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory  # read by prometheus-client when each worker imports it
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_run, args=(os.getpid(), target, *args, index),
                                 name=f"promptcache-worker-{index}") for index in range(workers)]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in processes:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in processes:
        p.start()
    _log.info("started %d workers", workers, extra={"pids": [p.pid for p in processes]})
    status = 0
    running = list(processes)
    while running:
        multiprocessing.connection.wait([p.sentinel for p in running])
        for p in [p for p in running if p.exitcode is not None]:
            running.remove(p)
            if p.pid is not None:
                multiprocess.mark_process_dead(p.pid)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
            if not stopping:
                status = p.exitcode or 1
                _log.error("worker %s exited with %s; stopping the others", p.name, p.exitcode)
                stop(signal.SIGTERM, None)
    return status


def _run(parent: int, target: Callable[..., int], *args: Any) -> None:
    _die_with(parent)
    raise SystemExit(target(*args))


def _die_with(parent: int) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot pass a stop on, and its workers would keep the
    port: the kernel sends each a SIGTERM when the parent dies (Linux's ``PR_SET_PDEATHSIG``), so it drains and exits
    as on any stop. Checked once after asking, for a parent gone before the request."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        _log.warning("cannot ask to be stopped with the supervisor: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        raise SystemExit(1)
