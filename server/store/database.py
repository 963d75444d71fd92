"""The MongoDB connection, the collections and their indexes.

This module is the one place that knows collection names. Each collection is declared
with its indexes next to it, and `Store.open` creates them idempotently at start-up, so
every process (and every test) sees the same layout.

Writes acknowledge only once they are journaled on a majority of the replica set:
`w="majority", j=True` on the client and on every transaction commit. That is DESIGN.md's
"durability before acknowledgement": a 2xx is never sent for a write a crash can lose.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pymongo
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DocumentTooLarge, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

T = TypeVar("T")

DURABLE = WriteConcern(w="majority", j=True)
NAMESPACE_EXISTS = 48
INDEX_BUILD_ALREADY_IN_PROGRESS = 276
CLOSE_SECONDS = 2.0

# Server error codes saying one transaction holds more than MongoDB can commit at once
# (its writes do not fit in the WiredTiger cache, it ran past the transaction lifetime
# limit, or a document or oplog entry passed 16 MB). Re-running cannot help, so they end
# the transaction as `TransactionTooLarge` instead of surfacing as internal errors.
TOO_LARGE_CODES = {
    290: "TransactionExceededLifetimeLimitSeconds",
    334: "TransactionTooLarge",
    388: "TransactionTooLargeForCache",
    10334: "BSONObjectTooLarge",
}


# A transaction larger than the WiredTiger cache does not always end with
# TransactionTooLargeForCache: a write may find the cache full (a WriteConflict, "Cache
# full while performing initial write to ...") or MongoDB may abort the transaction under
# it to free the cache (its next write gets NoSuchTransaction). Both are labelled
# TransientTransactionError, so PyMongo re-ran the whole transaction for up to 120 s,
# each run failing the same way, and the answer was a 503 after two minutes (a 54 MB
# Bundle, 0.25 GB cache). A transaction whose body fails so on CACHE_FULL_RUNS of its
# runs is taken as too large for the cache; one that met a cache briefly full under other
# writers' load, or a failover, gets its retry.
WRITE_CONFLICT = 112
NO_SUCH_TRANSACTION = 251
CACHE_FULL_RUNS = 2


def _cache_could_not_hold(exc: OperationFailure) -> bool:
    """Whether a run of a transaction's body failed as one too large for the cache can."""
    return exc.code == NO_SUCH_TRANSACTION or exc.code == WRITE_CONFLICT and "Cache full" in str(exc)


class TransactionTooLarge(Exception):
    """One transaction's writes exceed what MongoDB can commit; nothing was written."""


def too_large_reason(exc: Exception) -> str | None:
    """The MongoDB error name when `exc` says the transaction is too large, else None."""
    if isinstance(exc, DocumentTooLarge):
        return "BSONObjectTooLarge"
    codes: list[int | None]
    if isinstance(exc, BulkWriteError):  # insert_many: the reason is in its write errors
        codes = [e.get("code") for e in exc.details.get("writeErrors", [])]
    elif isinstance(exc, OperationFailure):
        codes = [exc.code]
    else:
        return None
    return next((TOO_LARGE_CODES[c] for c in codes if c in TOO_LARGE_CODES), None)


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    indexes: list[IndexModel] = field(default_factory=list)


# Registry of every collection; modules that own a collection add their spec here at import.
COLLECTIONS: dict[str, CollectionSpec] = {}


def collection(name: str, *indexes: IndexModel) -> CollectionSpec:
    """Declare a collection and its indexes (idempotent by name)."""
    spec = CollectionSpec(name, list(indexes))
    COLLECTIONS[name] = spec
    return spec


class Store:
    """One MongoDB client per process, shared by every service."""

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        self.client = client
        self.db: AsyncDatabase[dict[str, Any]] = client.get_database(
            database, write_concern=DURABLE, read_concern=ReadConcern("majority")
        )

    @classmethod
    async def open(cls, uri: str, database: str) -> Store:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            w="majority",
            journal=True,
            tz_aware=True,
            tzinfo=UTC,
            uuidRepresentation="standard",
        )
        store = cls(client, database)
        await store.check_server()
        await store.ensure_collections()
        return store

    async def check_server(self) -> None:
        info = await self.client.admin.command("buildInfo")
        major = int(str(info["version"]).split(".")[0])
        if major < 6:
            raise RuntimeError(f"MongoDB {info['version']} is too old; Kuroshio needs >= 6")
        hello = await self.client.admin.command("hello")
        if not (hello.get("setName") or hello.get("msg") == "isdbgrid"):
            raise RuntimeError(
                "MongoDB is a standalone server; Kuroshio needs a replica set or a sharded "
                "cluster for transactions (a one-member replica set is enough)"
            )

    async def ensure_collections(self) -> None:
        """Create what is missing; several server processes may do this at once, so a
        collection another one just created is not an error, and an index build another
        one started is waited for and then confirmed."""
        existing = set(await self.db.list_collection_names())
        for spec in COLLECTIONS.values():
            if spec.name not in existing:
                try:
                    await self.db.create_collection(spec.name, check_exists=False)
                except OperationFailure as exc:
                    if exc.code != NAMESPACE_EXISTS:
                        raise
            while spec.indexes:
                try:
                    await self.db[spec.name].create_indexes(spec.indexes)
                    break
                except OperationFailure as exc:
                    if exc.code != INDEX_BUILD_ALREADY_IN_PROGRESS:
                        raise
                await asyncio.sleep(0.1)

    def __getitem__(self, spec: CollectionSpec) -> AsyncCollection[dict[str, Any]]:
        return self.db[spec.name]

    async def transaction(self, body: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        """Run `body` in one multi-document transaction, committed durably.

        PyMongo retries the whole body on transient errors (write conflicts between
        concurrent transactions), so `body` must be safe to re-run from the start. A
        transaction too large for MongoDB raises `TransactionTooLarge` (it was aborted),
        as does one whose body failed for want of cache on CACHE_FULL_RUNS of its runs.
        """
        cache_full_runs = 0

        async def run(session: AsyncClientSession) -> T:
            nonlocal cache_full_runs
            try:
                return await body(session)
            except OperationFailure as exc:
                if not _cache_could_not_hold(exc):
                    raise
                cache_full_runs += 1
                if cache_full_runs >= CACHE_FULL_RUNS:  # not a PyMongoError: not re-run
                    raise TransactionTooLarge(f"CacheFull: {exc}") from exc
                raise

        async with self.client.start_session() as session:
            try:
                return await session.with_transaction(
                    run, write_concern=DURABLE, read_concern=ReadConcern("snapshot")
                )
            except (OperationFailure, DocumentTooLarge) as exc:
                reason = too_large_reason(exc)
                if reason is None:
                    raise
                raise TransactionTooLarge(f"{reason}: {exc}") from exc

    async def close(self) -> None:
        """Close the client. Closing ends the server sessions with one more command, which
        waits for server selection (30 s) when MongoDB has gone first; a stopping server
        does not wait that long for a courtesy."""
        with pymongo.timeout(CLOSE_SECONDS):
            await self.client.close()


def regex_literal(text: str) -> str:
    """`text` as a MongoDB regular expression that matches it literally.

    `re.escape` leaves a NUL character as it is, and MongoDB refuses a pattern holding a
    NUL byte ("Regular expression cannot contain an embedded null byte"): a search for
    `name=%00` (FHIR) or `PatientID=a%00*` (QIDO) was a 500. PCRE's `\\x00` escape matches
    the same character, so a value stored with a NUL can still be found.
    """
    return re.escape(text).replace("\x00", "\\x00")


async def find_first(
    collection: AsyncCollection[dict[str, Any]],
    query: dict[str, Any],
    projection: dict[str, Any] | None = None,
    session: AsyncClientSession | None = None,
) -> dict[str, Any] | None:
    """The first document matching `query`, as `find_one` returns it, by one `find`
    command: `find_one` builds, iterates and closes a cursor, about 80 us more of Python
    a call, and point reads (a FHIR read, a frame, a $lookup) are the hottest paths."""
    command: dict[str, Any] = {"find": collection.name, "filter": query, "limit": 1, "singleBatch": True}
    if projection is not None:
        command["projection"] = projection
    reply = await collection.database.command(
        command, session=session, codec_options=collection.codec_options,
        read_preference=collection.read_preference,
    )
    batch = reply["cursor"]["firstBatch"]
    return batch[0] if batch else None
