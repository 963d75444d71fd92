"""Several server processes on one port: `kuroshio serve --workers N`.

One Python process runs one core; the HTTP side scales by processes, which is safe
because no part of the server assumes it is the only one (see ../DESIGN.md, "Scale").

Why not uvicorn's own `--workers`: its workers share one listening socket, and with
keep-alive clients (integration engines, viewers, load generators that open their
connections at once) one worker accepts most of them while the others idle. Here each
worker binds its own socket with SO_REUSEPORT, so the kernel spreads new connections
over the workers. Worker 0 also runs the DIMSE Application Entity. A worker that dies
is replaced under the same number; one that fails to start stops the server (it would
fail the same way again); SIGINT or SIGTERM stops all workers, gracefully.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from server.config import Settings

log = logging.getLogger("kuroshio.workers")
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
STARTUP_FAILURE = 3
STOP_GRACE_SECONDS = 15.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(host: str, port: int) -> bool:
    """No other program (another server with SO_REUSEPORT included) listens there."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's socket, bound but not yet listening: uvicorn listens on it once the app
    has started, so the kernel gives a worker that is still starting (or failing to) no
    connections to hold or reset."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_worker(settings: Settings, number: int, options: dict[str, Any], supervisor: int) -> None:
    """The body of worker `number` (a process spawned by `supervisor`)."""
    import uvicorn

    from server.app import create_app
    from server.store.mongod import die_with_parent

    die_with_parent(supervisor)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sock = worker_socket(settings.host, settings.port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, dimse=number == 0), **options))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def supervise(settings: Settings, options: dict[str, Any]) -> bool:
    """Run `settings.workers` workers until SIGINT/SIGTERM; False if one failed to start."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)

    def start(number: int) -> BaseProcess:
        process = context.Process(target=run_worker, args=(settings, number, options, os.getpid()), name=f"kuroshio-worker-{number}")
        process.start()
        return process

    workers = {number: start(number) for number in range(settings.workers)}
    started = True
    while not stopping:
        wait([p.sentinel for p in workers.values()], timeout=0.5)
        for number, process in list(workers.items()):
            if process.is_alive() or stopping:
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %d failed to start; stopping the server", number)
                started, stopping = False, True
                break
            log.warning("worker %d (pid %s) ended with %s; starting a new one", number, process.pid, process.exitcode)
            workers[number] = start(number)
    for process in workers.values():
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in workers.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return started
