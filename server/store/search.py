"""The store side of FHIR search: the indexes over the search terms and the queries.

Search terms live in the `s` field of each current document of `fhir_resources` (layout
in server/fhir/search/terms.py). A few multikey indexes serve every parameter of every
resource type, each led by the resource type (the leading part of the shard key):
strings/tokens/references/uris in `s.k`, ranges in `s.v`, composites in `s.c`, and one
text index for `_text`/`_content`. Filters arrive already built by the search compiler
from typed values: nothing here interprets user input.

Conditional writes (create with If-None-Exist, conditional update) claim their match URL
in `fhir_conditional` inside the write's transaction: two concurrent transactions
claiming the same URL conflict in MongoDB, so one of them re-runs, sees the other's
resource and matches it instead of creating a second one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, TEXT, IndexModel, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, OperationFailure

from server.store.database import Store, collection
from server.store.fhir import RESOURCES, VersionConflict

SEARCH_INDEXES = [
    # the default order (the `date` parameter, then _id) comes from the index itself
    IndexModel([("t", ASCENDING), ("s.k", ASCENDING), ("s.o.date", ASCENDING), ("_id", ASCENDING)], name="search_keys"),
    # the same order for the few resources whose `date` values span more than a day, so
    # that a search bounded from below can bound the order key of all the others
    IndexModel([("t", ASCENDING), ("s.k", ASCENDING), ("s.o.date", ASCENDING), ("_id", ASCENDING)],
               name="search_keys_wide_date", partialFilterExpression={"s.w": "date"}),
    IndexModel([("t", ASCENDING), ("s.v.p", ASCENDING), ("s.v.lo", ASCENDING), ("s.v.hi", ASCENDING)], name="search_ranges"),
    IndexModel([("t", ASCENDING), ("s.c.p", ASCENDING), ("s.c.k0", ASCENDING)], name="search_composites"),
    IndexModel([("s.tx", TEXT), ("s.cx", TEXT)], name="search_text", default_language="none", weights={"s.tx": 2, "s.cx": 1}),
]
# The search indexes belong to the resources collection declared in server/store/fhir.py.
RESOURCES.indexes.extend(i for i in SEARCH_INDEXES if i.document["name"] not in {x.document["name"] for x in RESOURCES.indexes})

CONDITIONAL = collection("fhir_conditional")

Filter = dict[str, Any]
Sort = list[tuple[str, int]]
_PAGE_FIELDS = {"t": 1, "body": 1}  # and the sort keys in use, for cursors
_INCLUDE_FIELDS = {**_PAGE_FIELDS, "s.k": 1}  # and the references, to follow _include


class QueryTooCostly(Exception):
    """MongoDB gave up on a query within the time limit."""


class SearchStore:
    """The search queries, run on committed data, or with `session` inside that session's
    transaction, so that a GET entry of a transaction Bundle sees the transaction's
    writes (`in_session`)."""

    def __init__(self, store: Store, max_time_ms: int = 30_000, session: AsyncClientSession | None = None) -> None:
        self.store = store
        self.resources = store[RESOURCES]
        # Pages decode their datetimes (the sort keys, read for cursors alone) naive, in
        # UTC: making each time zone-aware cost more than decoding the rest of the page.
        self.pages = self.resources.with_options(
            codec_options=self.resources.codec_options.with_options(tz_aware=False, tzinfo=None)
        )
        self.conditional = store[CONDITIONAL]
        self.max_time_ms = max_time_ms
        self.session = session

    def in_session(self, session: AsyncClientSession) -> SearchStore:
        """The same queries inside `session`'s transaction."""
        return SearchStore(self.store, self.max_time_ms, session)

    async def page(self, query: Filter, sort: Sort, limit: int, with_keys: bool = False) -> list[dict[str, Any]]:
        """Matching current documents (body, the keys of `sort`, and with_keys the terms),
        in order. Only the sort keys in use are read: a resource has one per parameter it
        has values for, and decoding them all was a fifth of a page's decoding time. Their
        datetimes are naive (UTC)."""
        fields = {**(_INCLUDE_FIELDS if with_keys else _PAGE_FIELDS), **{name: 1 for name, _ in sort if name != "_id"}}
        try:
            cursor = self.pages.find(
                query, fields, sort=sort, limit=limit,
                max_time_ms=self.max_time_ms, allow_disk_use=True, session=self.session,
            )
            return await cursor.to_list()
        except OperationFailure as exc:
            raise _too_costly(exc) from None

    async def count(self, query: Filter, limit: int | None = None) -> int:
        """How many documents match (counting stops at `limit` when one is given)."""
        options: dict[str, Any] = {"maxTimeMS": self.max_time_ms}
        if limit is not None:
            options["limit"] = limit
        try:
            return await self.resources.count_documents(query, session=self.session, **options)
        except OperationFailure as exc:
            raise _too_costly(exc) from None

    async def count_keys(self, query: Filter, limit: int) -> int:
        """How many documents match, up to `limit`, by the `count` command: on a query of
        index fields it counts index keys alone (COUNT_SCAN), where `count_documents`
        fetches every document it counts. On a sharded cluster it may also count orphaned
        documents of a migrating chunk, so it serves estimates, not `_total=accurate`.
        In a transaction, where MongoDB refuses `count`, it counts as `count` does."""
        if self.session is not None:
            return await self.count(query, limit)
        command = {"count": self.resources.name, "query": query, "limit": limit, "maxTimeMS": self.max_time_ms}
        try:
            reply = await self.resources.database.command(command, codec_options=self.resources.codec_options)
        except OperationFailure as exc:
            raise _too_costly(exc) from None
        return int(reply["n"])

    async def ids(self, query: Filter, limit: int, session: AsyncClientSession | None = None) -> list[str]:
        """`Type/id` of up to `limit` matching resources (in `session`, else the store's)."""
        try:
            cursor = self.resources.find(
                query, {"_id": 1}, limit=limit, session=session or self.session, max_time_ms=self.max_time_ms
            )
            return [doc["_id"] async for doc in cursor]
        except OperationFailure as exc:
            raise _too_costly(exc) from None

    async def keys(self, query: Filter, limit: int) -> list[list[str]]:
        """The `s.k` terms of up to `limit` matching resources (reverse chaining)."""
        try:
            cursor = self.resources.find(query, {"s.k": 1}, limit=limit, max_time_ms=self.max_time_ms, session=self.session)
            return [doc.get("s", {}).get("k", []) async for doc in cursor]
        except OperationFailure as exc:
            raise _too_costly(exc) from None

    async def by_ids(self, keys: list[str]) -> list[dict[str, Any]]:
        """Current, not deleted documents by `Type/id` (includes)."""
        if not keys:
            return []
        cursor = self.resources.find({"_id": {"$in": keys}, "deleted": False}, _INCLUDE_FIELDS, session=self.session)
        return [doc async for doc in cursor]

    async def explain(self, query: Filter, sort: Sort, limit: int) -> dict[str, Any]:
        """The query planner's winning plan for a search (the `__explain` switch), on
        committed data: MongoDB does not explain inside a transaction."""
        command = {
            "explain": {"find": RESOURCES.name, "filter": query, "sort": dict(sort), "limit": limit},
            "verbosity": "executionStats",
        }
        result = await self.store.db.command(command)
        stats = result.get("executionStats", {})
        winning = result.get("queryPlanner", {}).get("winningPlan", {})
        return {
            "indexes": sorted(set(_index_names(winning))),
            "winningPlan": winning,
            "docsExamined": stats.get("totalDocsExamined"),
            "keysExamined": stats.get("totalKeysExamined"),
            "returned": stats.get("nReturned"),
            "millis": stats.get("executionTimeMillis"),
        }

    async def claim(self, session: AsyncClientSession, key: str, moment: datetime) -> None:
        """Write the conditional match key in this transaction (serializes same-key writers)."""
        try:
            await self.conditional.update_one(
                {"_id": key}, {"$set": {"ts": moment}}, upsert=True, session=session
            )
        except DuplicateKeyError:
            raise VersionConflict(key) from None

    async def meta_keys(self, type_: str | None) -> list[str]:
        """Distinct `_tag`, `_security` and `_profile` terms of current resources ($meta)."""
        prefixes = [{"s.k": {"$regex": r"^_tag\|"}}, {"s.k": {"$regex": r"^_security\|"}}, {"s.k": {"$regex": "^_profile>"}}]
        match: Filter = {"deleted": False, "$or": prefixes}
        if type_ is not None:
            match["t"] = type_
        pipeline = [
            {"$match": match},
            {"$project": {"k": "$s.k"}},
            {"$unwind": "$k"},
            {"$match": {"k": {"$regex": "^(_tag\\||_security\\||_profile>)"}}},
            {"$group": {"_id": "$k"}},
            {"$sort": {"_id": 1}},
        ]
        cursor = await self.resources.aggregate(pipeline)
        return [doc["_id"] async for doc in cursor]

    async def versions(self, query: Filter) -> dict[str, int]:
        """The current version of each matching document, by key: what changed, without
        reading the bodies."""
        return {doc["_id"]: doc["v"] async for doc in self.resources.find(query, {"v": 1})}

    async def bodies(self, query: Filter) -> AsyncIterator[dict[str, Any]]:
        """Current documents (id, version, body) in `_id` order, for re-indexing."""
        cursor = self.resources.find(query, {"v": 1, "body": 1}, sort=[("_id", ASCENDING)], batch_size=500)
        async for doc in cursor:
            yield doc

    async def set_terms(self, updates: list[tuple[str, int, dict[str, Any]]]) -> int:
        """Replace the search terms of (key, version) documents still at that version."""
        if not updates:
            return 0
        result = await self.resources.bulk_write(
            [UpdateOne({"_id": key, "v": version}, {"$set": {"s": terms}}) for key, version, terms in updates],
            ordered=False,
        )
        return result.modified_count


def _index_names(plan: Any) -> list[str]:
    names = []
    if isinstance(plan, dict):
        if "indexName" in plan:
            names.append(plan["indexName"])
        if plan.get("stage") == "COLLSCAN":
            names.append("(collection scan)")
        for value in plan.values():
            names.extend(_index_names(value))
    elif isinstance(plan, list):
        for item in plan:
            names.extend(_index_names(item))
    return names


def _too_costly(exc: OperationFailure) -> Exception:
    if exc.code == 50:  # MaxTimeMSExpired
        return QueryTooCostly(str(exc))
    return exc
