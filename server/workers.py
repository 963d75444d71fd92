"""Several server processes on one port: `kuroshio serve --workers N`.

One Python process runs one core; the HTTP side scales by processes, which is safe
because no part of the server assumes it is the only one (see ../DESIGN.md, "Scale").

Why the supervisor accepts the connections itself: clients keep their connections open
(integration engines, viewers, load generators open theirs at once), so where a
connection lands decides a worker's load for its whole life. With one shared socket (uvicorn's own
`--workers`) the first worker to wake accepts most of a burst; with a socket per worker
and SO_REUSEPORT the kernel spreads them by a hash of the addresses, which put 7 of 8
connections on one worker in 3 of 5 measured runs. So the supervisor accepts, and hands
each connection (its descriptor, over a Unix socket) to the ready worker with the fewest
open connections, as a least-connections load balancer does. Workers report each
closed connection back. The supervisor listens only once a worker has started, so no
connection waits on a server that cannot answer yet.

Worker 0 also runs the DIMSE Application Entity. A worker that dies is replaced under
the same number. If a worker fails to start when the server starts, the server stops (a
setting is wrong: it would fail the same way again); a replacement that fails to start
(MongoDB briefly unreachable, its port not yet free) is retried, 1 s later and then at
doubling intervals up to a minute, while the other workers serve. SIGINT or SIGTERM
stops all workers, gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from server.config import Settings

log = logging.getLogger("kuroshio.workers")
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
STARTUP_FAILURE = 3
STOP_GRACE_SECONDS = 15.0
BACKLOG = 2048
ACCEPTS_PER_WAKE = 64
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
CLOSED = struct.Struct("=Q")  # a worker's report: how many handed connections it has closed


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's one HTTP socket, bound now (so a port in use is reported at once) and
    listened on when the first worker is ready. OSError if the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HandedConnectionsServer(uvicorn.Server):
    """uvicorn serving the connections the supervisor hands over on `channel`, instead of
    listening on a socket of its own, and reporting each one it closes."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self.closed = 0
        self.opening: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's start-up; exits the process if that fails
        loop = asyncio.get_running_loop()
        server = self

        class Counted(self.config.http_protocol_class):  # type: ignore[name-defined, misc]
            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                server.report_closed()

        self.protocol = lambda: Counted(config=self.config, server_state=self.server_state,
                                        app_state=self.lifespan.state, _loop=loop)
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self.take)
        self.report_closed(0)  # the first report says: ready

    def report_closed(self, count: int = 1) -> None:
        self.closed += count
        try:  # the supervisor reads at once; a report lost to a full buffer is made good by the next
            self.channel.send(CLOSED.pack(self.closed))
        except (BlockingIOError, BrokenPipeError):
            pass

    def take(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 1, 1)
            except BlockingIOError:
                return
            if not message:  # the supervisor is gone
                self.should_exit = True
                loop.remove_reader(self.channel.fileno())
                return
            for fd in fds:
                task = loop.create_task(self.open(socket.socket(fileno=fd)))
                self.opening.add(task)
                task.add_done_callback(self.opening.discard)

    async def open(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.protocol, sock)
        except OSError:  # the client left before we got to it
            sock.close()
            self.report_closed()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().remove_reader(self.channel.fileno())
        await super().shutdown(sockets=[])


def run_worker(settings: Settings, number: int, options: dict[str, Any], supervisor: int, channel: socket.socket) -> None:
    """The body of worker `number` (a process spawned by `supervisor`)."""
    from server.app import create_app
    from server.store.mongod import die_with_parent

    die_with_parent(supervisor)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    server = HandedConnectionsServer(uvicorn.Config(create_app(settings, dimse=number == 0), **options), channel)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


@dataclass
class Worker:
    """The supervisor's view of one worker."""

    number: int
    process: BaseProcess
    channel: socket.socket
    handed: int = 0
    closed: int = 0
    ready: bool = False
    ended: bool = False

    @property
    def load(self) -> tuple[int, int]:
        """Open connections first; among equals, the one handed fewer so far."""
        return self.handed - self.closed, self.handed


def supervise(settings: Settings, options: dict[str, Any], listener: socket.socket) -> bool:
    """Run `settings.workers` workers until SIGINT/SIGTERM; False if one failed to start."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)

    selector = selectors.DefaultSelector()
    workers: dict[int, Worker] = {}
    accepting = False
    served: set[int] = set()  # numbers whose worker has started at least once
    retry_at: dict[int, float] = {}  # number -> when to start a replacement that failed to start
    retry_interval: dict[int, float] = {}

    def start(number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = context.Process(target=run_worker, args=(settings, number, options, os.getpid(), theirs),
                                  name=f"kuroshio-worker-{number}")
        process.start()
        theirs.close()
        ours.setblocking(False)
        worker = workers[number] = Worker(number, process, ours)
        selector.register(ours, selectors.EVENT_READ, ("reports", worker))
        selector.register(process.sentinel, selectors.EVENT_READ, ("ended", worker))

    def read_reports(worker: Worker) -> None:
        while True:
            try:
                message = worker.channel.recv(CLOSED.size)
            except BlockingIOError:
                return
            if not message:  # the worker is gone; its sentinel says how
                return
            worker.closed, worker.ready = CLOSED.unpack(message)[0], True
            served.add(worker.number)
            retry_interval.pop(worker.number, None)

    def retry_later(number: int) -> None:
        interval = min(retry_interval.get(number, RETRY_FIRST_SECONDS / 2) * 2, RETRY_MAX_SECONDS)
        log.error("worker %d failed to start; trying again in %.0f s", number, interval)
        retry_interval[number], retry_at[number] = interval, time.monotonic() + interval

    def hand_over() -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                return
            with connection:
                for worker in sorted((w for w in workers.values() if w.ready), key=lambda w: w.load):
                    try:
                        socket.send_fds(worker.channel, [b"c"], [connection.fileno()])
                    except OSError:  # its buffer is full or it has just died: the next one
                        continue
                    worker.handed += 1
                    break

    for number in range(settings.workers):
        start(number)
    started = True
    try:  # whatever ends the loop, even a fault of ours, the workers end with it
        while not stopping:
            for key, _ in selector.select(timeout=0.5):
                if key.fileobj is listener:
                    hand_over()
                    continue
                what, worker = key.data
                if worker.ended:  # its channel's EOF, fetched by the same select as its end: its channel is closed
                    continue
                if what == "reports":
                    read_reports(worker)
                    continue
                number, worker.ended = worker.number, True
                selector.unregister(worker.channel)
                selector.unregister(worker.process.sentinel)
                worker.channel.close()
                worker.process.join()
                worker.ready = False
                if stopping:
                    continue
                if worker.process.exitcode != STARTUP_FAILURE:
                    log.warning("worker %d (pid %s) ended with %s; starting a new one", number, worker.process.pid, worker.process.exitcode)
                    start(number)
                elif number in served:
                    retry_later(number)
                else:
                    log.error("worker %d failed to start; stopping the server", number)
                    started, stopping = False, True
                    break
            for number, when in list(retry_at.items()):
                if when <= time.monotonic() and not stopping:
                    del retry_at[number]
                    start(number)
            ready = any(w.ready for w in workers.values())
            if ready and not accepting:
                listener.listen(BACKLOG)  # again after a pause: harmless
                selector.register(listener, selectors.EVENT_READ)
                accepting = True
            elif accepting and not ready:  # connections wait in the backlog for a worker
                selector.unregister(listener)
                accepting = False
    finally:
        stop_workers(listener, workers.values())
    return started


def stop_workers(listener: socket.socket, workers: Collection[Worker]) -> None:
    """Close the HTTP socket, then end the workers: gracefully, then by force. Without this
    a supervisor would wait forever at exit on its live (non-daemon) workers."""
    listener.close()
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
