"""fhir.resources checks of a transaction's entries, in a worker process.

fhir.resources (pydantic models) costs about 300 us a resource, some three eighths of the
CPU a transaction entry takes, and the server's event loop runs on one core. A
transaction therefore hands each entry's serialized version to a worker process, in
chunks as it prepares them, sends its writes to MongoDB while the worker checks, and
collects the verdicts before it commits (a fault aborts the writes): the same check on
the same bytes, run beside the loop and the database instead of before them. A transaction with fewer than
`CHUNK` entries to check is checked in-process (the hop would cost more than it saves),
and so is a chunk whose worker died (the pool is then replaced on next use).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from server.fhir import jsonio
from server.fhir.outcome import Issue
from server.fhir.validation import fhir_resources_issues
from server.store.mongod import die_with_parent

CHUNK = 64

_workers = 0
_running: ProcessPoolExecutor | None = None


def configure(workers: int) -> None:
    """Use `workers` processes from now on (0: check everything in-process)."""
    global _workers
    shutdown()
    _workers = workers


def shutdown() -> None:
    global _running
    if _running is not None:
        _running.shutdown(wait=False, cancel_futures=True)
        _running = None


def _pool() -> ProcessPoolExecutor | None:
    global _running
    if not _workers:
        return None
    if _running is None:
        # spawn: a fresh interpreter (not a fork of the event loop and its sockets) whose
        # parent is this process, so that it can end with it even when this is killed
        _running = ProcessPoolExecutor(
            _workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
    return _running


def issues_of(bodies: list[bytes]) -> list[list[Issue]]:
    """The worker's job: fhir.resources' verdict on each serialized resource."""
    return [fhir_resources_issues(jsonio.loads(body)) for body in bodies]


@dataclass
class _Chunk:
    indexes: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    future: Future[list[list[Issue]]] | None = None


@dataclass
class LibraryChecks:
    """The deferred checks of one transaction, by entry index."""

    chunks: list[_Chunk] = field(default_factory=lambda: [_Chunk()])
    found: list[tuple[int, list[Issue]]] | None = None  # the verdict, once collected

    def add(self, index: int, body: bytes, resource: dict[str, Any]) -> None:
        chunk = self.chunks[-1]
        chunk.indexes.append(index)
        chunk.bodies.append(body)
        chunk.resources.append(resource)
        if len(chunk.bodies) >= CHUNK and (pool := _pool()) is not None:
            try:
                chunk.future = pool.submit(issues_of, chunk.bodies)
            except (BrokenProcessPool, RuntimeError):  # died, or shut down meanwhile
                shutdown()
            self.chunks.append(_Chunk())

    async def problems(self) -> list[tuple[int, list[Issue]]]:
        """(entry index, issues) of every entry fhir.resources finds fault with; collected
        once (a transaction's body that MongoDB re-runs asks again)."""
        if self.found is not None:
            return self.found
        found: list[tuple[int, list[Issue]]] = []
        for chunk in self.chunks:
            verdicts: list[list[Issue]] | None = None
            if chunk.future is not None:
                try:
                    verdicts = await asyncio.wrap_future(chunk.future)
                except BrokenProcessPool:
                    shutdown()
            if verdicts is None:
                verdicts = [fhir_resources_issues(resource) for resource in chunk.resources]
            found.extend((index, issues) for index, issues in zip(chunk.indexes, verdicts, strict=True) if issues)
        self.found = found
        return found
