"""FHIR resources in MongoDB: the current version of each resource and its history.

Three collections:
- `fhir_resources` holds the current version of every resource ever written, deleted ones
  as tombstones (so a re-create continues the version sequence). Its `_id` is
  `"Type/id"`, which makes the resource type the leading part of the shard key; search
  terms (`s`) live beside the body so a search is one indexed query. The current version
  is also its own history entry (`h`, `m`).
- `fhir_history` holds the versions that have been superseded. A version moves there
  when the next one replaces it, so a resource that is never changed is stored once and
  its create is one document insert (no multi-document transaction: about 1.5x the
  creates/s of inserting it twice in one transaction, measured with 8 clients).
- `fhir_bodies` holds, in chunks, the bodies too large for a MongoDB document (16 MB):
  such a version's documents carry `chunks` (their number) instead of `body`; the chunks
  stay where they are when the version moves to history.

A vread or a history request reads both collections: the history entries are the
superseded versions and the current ones, merged in one order (`ts`, then the entry key
`"Type/id/version"`: `_id` in history, `h` in the current document), read in one snapshot
so that a version moving between them is seen once.

A write replaces the current document only if it still has the version the writer read
(compare-and-set) and inserts the replaced version into history, both in one transaction;
the unique index on (type, id, version) makes a duplicate version impossible even if a
caller forgets the transaction. Bodies are the exact JSON bytes the server returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from bson import Binary
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, OperationFailure

from server.store.database import Store, collection, find_first

RESOURCES = collection(
    "fhir_resources",
    IndexModel([("t", ASCENDING), ("ts", DESCENDING), ("h", DESCENDING)], name="type_history"),
    IndexModel([("ts", DESCENDING), ("h", DESCENDING)], name="system_history"),
)
HISTORY = collection(
    "fhir_history",
    IndexModel([("t", ASCENDING), ("i", ASCENDING), ("v", DESCENDING)], name="version", unique=True),
    IndexModel([("ts", DESCENDING), ("_id", DESCENDING)], name="system_history"),
    IndexModel([("t", ASCENDING), ("ts", DESCENDING), ("_id", DESCENDING)], name="type_history"),
)


BODIES = collection("fhir_bodies")
# Which layout upgrades a database has had (`FhirStore.upgrade`), one document each.
UPGRADES = collection("kuroshio_upgrades")
SUPERSEDED_ONLY_HISTORY = "fhir superseded-only history"

# Bodies up to this size live in the resource's own documents (which must also hold the
# search terms under MongoDB's 16 MB limit); larger ones are split into chunks this big.
INLINE_LIMIT = 8 * 1024 * 1024
CHUNK_SIZE = 8 * 1024 * 1024


# A group commit holds at most this many creates, and bodies of at most this many bytes.
GROUP_CREATES = 64
GROUP_BYTES = 8 * 1024 * 1024
# Groups committing at once in one process: while one waits for its journal flush,
# another is sent.
GROUPS_IN_FLIGHT = 2

AfterWrite = Callable[[AsyncClientSession | None, "NewVersion"], Awaitable[None]]


@dataclass(slots=True)
class _Waiting:
    new: NewVersion
    after_write: AfterWrite
    done: asyncio.Future[None]


class VersionConflict(Exception):
    """The resource changed between the read and the write (or already exists)."""


@dataclass(slots=True)
class StoredResource:
    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    body: bytes | None
    method: str = ""


@dataclass(slots=True)
class NewVersion:
    """One version to persist. `body` is None for a delete."""

    type: str
    id: str
    version: int
    last_updated: datetime
    method: str
    body: bytes | None
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.type}/{self.id}"

    @property
    def chunked(self) -> bool:
        return self.body is not None and len(self.body) > INLINE_LIMIT

    def _body_fields(self) -> dict[str, Any]:
        if self.body is None:
            return {"body": None}
        if self.chunked:
            return {"body": None, "chunks": -(-len(self.body) // CHUNK_SIZE)}
        return {"body": Binary(self.body)}

    def chunk_documents(self) -> list[dict[str, Any]]:
        assert self.body is not None
        return [
            {"_id": f"{self.key}/{self.version}/{n}", "data": Binary(self.body[start : start + CHUNK_SIZE])}
            for n, start in enumerate(range(0, len(self.body), CHUNK_SIZE))
        ]

    def current_document(self) -> dict[str, Any]:
        return {
            "_id": self.key,
            "t": self.type,
            "v": self.version,
            "ts": self.last_updated,
            "h": f"{self.key}/{self.version}",
            "m": self.method,
            "deleted": self.body is None,
            **self._body_fields(),
            "s": self.search,
        }


_CURRENT_FIELDS = {"v": 1, "ts": 1, "m": 1, "deleted": 1, "body": 1, "chunks": 1}
_HISTORY_ENTRY_FIELDS = {**_CURRENT_FIELDS, "t": 1, "h": 1}
# What a current document keeps when it moves to history (with its `_id` and `h`).
_SUPERSEDED_FIELDS = {"t": 1, "v": 1, "ts": 1, "h": 1, "m": 1, "body": 1, "chunks": 1}


def _from_current(type_: str, id_: str, doc: dict[str, Any]) -> StoredResource:
    body = doc.get("body")
    return StoredResource(type_, id_, doc["v"], doc["ts"], doc["deleted"], bytes(body) if body else None, doc["m"])


def _superseded(doc: dict[str, Any]) -> dict[str, Any]:
    """The history document of a current document that a new version replaces."""
    history = {"_id": doc["h"], "t": doc["t"], "i": doc["_id"].split("/", 1)[1], "v": doc["v"], "ts": doc["ts"],
               "m": doc["m"], "body": doc.get("body")}
    if doc.get("chunks"):
        history["chunks"] = doc["chunks"]
    return history


def _from_history(doc: dict[str, Any]) -> StoredResource:
    body = doc.get("body")
    deleted = body is None and not doc.get("chunks")
    return StoredResource(
        doc["t"], doc["i"], doc["v"], doc["ts"], deleted, bytes(body) if body else None, doc["m"]
    )


class FhirStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.resources = store[RESOURCES]
        self.history = store[HISTORY]
        self.bodies = store[BODIES]
        self._waiting: list[_Waiting] = []
        self._committers: set[asyncio.Task[None]] = set()

    async def upgrade(self) -> None:
        """Bring a database written before superseded-only history to this layout: each
        current document gets its entry key and method, and its copy in history goes, in
        one transaction each. Done once (then recorded in UPGRADES, so that a start does
        not scan every resource); several processes may run it at once."""
        upgrades = self.store[UPGRADES]
        if await find_first(upgrades, {"_id": SUPERSEDED_ONLY_HISTORY}) is not None:
            return
        async for doc in self.resources.find({"h": {"$exists": False}}, {"v": 1}):
            await self.store.transaction(partial(self._upgrade_current, doc["_id"], doc["v"]))
        with contextlib.suppress(OperationFailure):  # replaced by type_history; absent once dropped
            await self.resources.drop_index("type_lastUpdated")
        await upgrades.update_one({"_id": SUPERSEDED_ONLY_HISTORY}, {"$set": {"at": datetime.now(UTC)}}, upsert=True)

    async def _upgrade_current(self, key: str, version: int, session: AsyncClientSession) -> None:
        entry = f"{key}/{version}"
        copy = await find_first(self.history, {"_id": entry}, {"m": 1}, session)
        upgraded = await self.resources.update_one(
            {"_id": key, "v": version, "h": {"$exists": False}},
            {"$set": {"h": entry, "m": copy["m"] if copy else "PUT"}}, session=session,
        )
        if upgraded.modified_count:
            await self.history.delete_one({"_id": entry}, session=session)

    async def joined_body(
        self, key: str, version: int, chunks: int, session: AsyncClientSession | None = None
    ) -> bytes:
        """The body of a chunked version ("Type/id", version, number of chunks)."""
        ids = [f"{key}/{version}/{n}" for n in range(chunks)]
        found = {d["_id"]: bytes(d["data"]) async for d in self.bodies.find({"_id": {"$in": ids}}, session=session)}
        return b"".join(found[i] for i in ids)

    async def complete(
        self, resource: StoredResource, doc: dict[str, Any], session: AsyncClientSession | None = None
    ) -> StoredResource:
        """Fill in the body of a chunked version from its chunks."""
        if doc.get("chunks"):
            resource.body = await self.joined_body(
                f"{resource.type}/{resource.id}", resource.version, doc["chunks"], session
            )
        return resource

    async def current(
        self, type_: str, id_: str, session: AsyncClientSession | None = None
    ) -> StoredResource | None:
        """The current version (a deleted one too), or None if never written."""
        doc = await find_first(self.resources, {"_id": f"{type_}/{id_}"}, _CURRENT_FIELDS, session)
        return await self.complete(_from_current(type_, id_, doc), doc, session) if doc else None

    async def version(
        self, type_: str, id_: str, version: int, session: AsyncClientSession | None = None
    ) -> StoredResource | None:
        """One version, current or superseded. The current document is read first: the
        usual vread is of the version just written, and a version that has moved on was in
        history by the time (one transaction moves it) the current one no longer had it."""
        key = f"{type_}/{id_}"
        doc = await find_first(self.resources, {"_id": key, "v": version}, _CURRENT_FIELDS, session)
        if doc is not None:
            return await self.complete(_from_current(type_, id_, doc), doc, session)
        doc = await find_first(self.history, {"_id": f"{key}/{version}"}, None, session)
        return await self.complete(_from_history(doc), doc, session) if doc else None

    @contextlib.asynccontextmanager
    async def _snapshot(self, session: AsyncClientSession | None) -> AsyncIterator[AsyncClientSession]:
        """`session`, or else a snapshot session (for `find` and `aggregate`: `find_first`'s
        command does not take its time): reads of both collections see one point in time,
        so a version that moves to history between them is listed exactly once."""
        if session is not None:
            yield session
            return
        async with self.store.client.start_session(snapshot=True) as snapshot:
            yield snapshot

    async def write(
        self, session: AsyncClientSession, new: NewVersion, expected_version: int | None
    ) -> None:
        """Persist `new` if the current version is still `expected_version` (None: absent).

        Must run inside `Store.transaction`; raises VersionConflict otherwise.
        """
        if new.chunked:
            await self.bodies.insert_many(new.chunk_documents(), session=session)
        if expected_version is None:
            try:
                await self.resources.insert_one(new.current_document(), session=session)
            except DuplicateKeyError:
                raise VersionConflict(new.key) from None
            return
        replaced = await self.resources.find_one_and_replace(
            {"_id": new.key, "v": expected_version}, new.current_document(), _SUPERSEDED_FIELDS, session=session
        )
        if replaced is None:
            raise VersionConflict(new.key)
        try:
            await self.history.insert_one(_superseded(replaced), session=session)
        except DuplicateKeyError:
            raise VersionConflict(new.key) from None

    async def create(self, new: NewVersion, after_write: AfterWrite) -> None:
        """Persist a new resource's first version (server-assigned id) durably, by group
        commit: creates that arrive while GROUPS_IN_FLIGHT groups are being written wait
        and then share the next one, one `insert_many` (durable write concern) of their
        current documents; a body too large for its document makes its group a
        transaction instead, which also writes the chunks. Each create still returns only
        once its own version is durable, and a create that finds no queue is written at
        once. If a group fails, each of its creates is settled alone: found stored (by
        its id, which only this create can have) or written again, so one create's
        failure is its own."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(new, after_write, done))
        if len(self._committers) < GROUPS_IN_FLIGHT:
            committer = asyncio.create_task(self._commit_waiting())
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        await done

    async def _commit_waiting(self) -> None:
        group: list[_Waiting] = []
        try:
            while self._waiting:
                size = 0
                for waiting in self._waiting[:GROUP_CREATES]:
                    if group and size >= GROUP_BYTES:
                        break
                    group.append(waiting)
                    size += len(waiting.new.body or b"")
                del self._waiting[:len(group)]
                await self._commit_group(group)
                group = []
        finally:
            for waiting in group:  # the task was cancelled: the server stops
                _resolve(waiting.done, RuntimeError("the server stopped before the create was committed"))

    async def _commit_group(self, group: list[_Waiting]) -> None:
        if len(group) > 1:
            try:
                await self._insert(group)
            except Exception:  # each create is settled alone below
                pass
            else:
                for waiting in group:
                    await _written(waiting)
                return
        for waiting in group:
            try:
                if len(group) == 1 or await find_first(self.resources, {"_id": waiting.new.key}, {"_id": 1}) is None:
                    await self._insert([waiting])
            except Exception as exc:  # it is this create's outcome
                _resolve(waiting.done, exc)
            else:
                await _written(waiting)

    async def _insert(self, group: list[_Waiting]) -> None:
        """Write a group's documents: one insert, or with chunks one transaction, in which
        the hooks of the creates with chunks run too (the others' once written, `_written`)."""
        new = [waiting.new for waiting in group]
        if any(n.chunked for n in new):
            async def body(session: AsyncClientSession) -> None:
                await self.create_many(session, new)
                for waiting in group:
                    if waiting.new.chunked:
                        await waiting.after_write(session, waiting.new)

            await self.store.transaction(body)
            return
        await self.resources.insert_many([n.current_document() for n in new], ordered=False)

    async def create_many(self, session: AsyncClientSession, new: list[NewVersion]) -> None:
        """Insert many first versions at once (server-assigned ids cannot collide)."""
        if not new:
            return
        chunks = [chunk for n in new if n.chunked for chunk in n.chunk_documents()]
        try:
            if chunks:
                await self.bodies.insert_many(chunks, ordered=False, session=session)
            await self.resources.insert_many(
                [n.current_document() for n in new], ordered=False, session=session
            )
        except DuplicateKeyError as exc:
            raise VersionConflict(str(exc)) from None

    async def history_page(
        self,
        scope: HistoryScope,
        after_key: tuple[datetime, str] | None,
        limit: int,
        session: AsyncClientSession | None = None,
    ) -> list[StoredResource]:
        """Versions newest first, resuming strictly after `after_key` (a keyset cursor):
        the first `limit` of each collection, merged."""
        rows: list[tuple[datetime, str, dict[str, Any], StoredResource]] = []
        async with self._snapshot(session) as snapshot:
            for current in (False, True):
                collection, key_field = (self.resources, "h") if current else (self.history, "_id")
                query = scope.filter(current)
                if after_key is not None:
                    ts, key = after_key
                    query["$or"] = [{"ts": {"$lt": ts}}, {"ts": ts, key_field: {"$lt": key}}]
                cursor = collection.find(
                    query, _HISTORY_ENTRY_FIELDS if current else None,
                    sort=[("ts", DESCENDING), (key_field, DESCENDING)], limit=limit, session=snapshot,
                )
                async for doc in cursor:
                    entry = _from_current(doc["t"], doc["_id"].split("/", 1)[1], doc) if current else _from_history(doc)
                    rows.append((doc["ts"], doc[key_field], doc, entry))
            rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
            return [await self.complete(entry, doc, snapshot) for _, _, doc, entry in rows[:limit]]

    async def history_count(self, scope: HistoryScope, session: AsyncClientSession | None = None) -> int:
        async with self._snapshot(session) as snapshot:
            superseded = await self.history.count_documents(scope.filter(current=False), session=snapshot)
            return superseded + await self.resources.count_documents(scope.filter(current=True), session=snapshot)


@dataclass(frozen=True, slots=True)
class HistoryScope:
    """Which versions a history request covers: system, type or instance, and a time window."""

    type: str | None = None
    id: str | None = None
    since: datetime | None = None
    before: datetime | None = None

    def filter(self, current: bool) -> dict[str, Any]:
        """The query of the scope's `current` documents, or of its superseded ones."""
        query: dict[str, Any] = {}
        if self.type is not None:
            query["t"] = self.type
        if self.id is not None:
            if current:
                query["_id"] = f"{self.type}/{self.id}"
            else:
                query["i"] = self.id
        window: dict[str, Any] = {}
        if self.since is not None:
            window["$gte"] = self.since
        if self.before is not None:
            window["$lt"] = self.before
        if window:
            query["ts"] = window
        return query


def history_key(resource: StoredResource) -> tuple[datetime, str]:
    """The keyset-cursor position of a history entry (matches the sort of history_page)."""
    return resource.last_updated, f"{resource.type}/{resource.id}/{resource.version}"


async def _written(waiting: _Waiting) -> None:
    """Report a stored create, after its after-write hooks (unless its transaction ran
    them): a hook's failure is that create's outcome."""
    try:
        if not waiting.new.chunked:
            await waiting.after_write(None, waiting.new)
    except Exception as exc:
        _resolve(waiting.done, exc)
    else:
        _resolve(waiting.done, None)


def _resolve(done: asyncio.Future[None], exc: BaseException | None) -> None:
    """Report an outcome to a create that may have stopped waiting (its client left)."""
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)
