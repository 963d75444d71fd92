"""Terminology tables in MongoDB: the definitions the engine resolves by canonical URL,
the concepts of every code system, and the rows of every concept map.

Three collections:
- `tx_canonicals`: one document per CodeSystem, ValueSet, ConceptMap and NamingSystem
  resource (`_id` "Type/id"), with its url, version and identifiers, and the resource's
  JSON bytes (a CodeSystem's without its concepts). Written by the FHIR write path's
  after-write hook, so a definition changes in the same transaction as its resource.
- `tx_concepts`: one document per concept, tagged with the generation (`g`) of the code
  system version it belongs to. Concepts carry indexed copies of what filters need:
  lower-cased code, ancestors (the transitive closure of is-a), parents, property
  values as `code=value` strings, and display/designation words for text search; the
  FHIR-shaped details (designations, properties, extensions) stay JSON bytes.
- `tx_mappings`: one document per ConceptMap element target (or unmatched element),
  indexed by source and by target so that $translate works both ways.

Large code systems (LOINC, SNOMED CT) are bulk-loaded into `tx_concepts` under a fresh
generation outside any transaction; the CodeSystem resource written afterwards points
at that generation, which switches readers atomically, and the old generation is purged.
Nothing here is held in process memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bson import Binary
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession

from server.store.database import Store, collection, find_first
from server.store.fhir import RESOURCES

CANONICALS = collection(
    "tx_canonicals",
    IndexModel([("t", ASCENDING), ("url", ASCENDING), ("version", ASCENDING)], name="type_url_version"),
    IndexModel([("ids", ASCENDING)], name="identifiers"),
)
CONCEPTS = collection(
    "tx_concepts",
    IndexModel([("g", ASCENDING), ("c", ASCENDING)], name="generation_code", unique=True),
    IndexModel([("g", ASCENDING), ("lc", ASCENDING)], name="generation_lower_code"),
    IndexModel([("g", ASCENDING), ("o", ASCENDING)], name="generation_order"),
    IndexModel([("g", ASCENDING), ("anc", ASCENDING)], name="generation_ancestors"),
    IndexModel([("g", ASCENDING), ("par", ASCENDING)], name="generation_parents"),
    IndexModel([("g", ASCENDING), ("pv", ASCENDING)], name="generation_property_values"),
    IndexModel([("g", ASCENDING), ("w", ASCENDING)], name="generation_words"),
)
MAPPINGS = collection(
    "tx_mappings",
    IndexModel([("g", ASCENDING)], name="generation"),
    IndexModel([("ss", ASCENDING), ("sc", ASCENDING)], name="source"),
    IndexModel([("ts", ASCENDING), ("tc", ASCENDING)], name="target"),
)
CLOSURES = collection("tx_closures")

BULK_BATCH = 2000
QUERY_CODES = 10_000  # codes per normalization query, well under MongoDB's 16 MB for a command


@dataclass(slots=True)
class Canonical:
    """A definition as the engine sees it: where it came from and its JSON bytes."""

    key: str  # "Type/id"
    type: str
    url: str | None
    version: str | None
    body: bytes  # the resource JSON (a CodeSystem's without concepts)
    generation: str | None = None  # CodeSystem: the concepts' generation
    count: int = 0  # CodeSystem: number of concepts stored
    identifiers: list[str] = field(default_factory=list)
    supplements: str | None = None

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": self.key,
            "t": self.type,
            "url": self.url,
            "version": self.version,
            "raw": Binary(self.body),
            "ids": self.identifiers,
            "n": self.count,
        }
        if self.generation is not None:
            doc["g"] = self.generation
        if self.supplements is not None:
            doc["supplements"] = self.supplements
        return doc

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Canonical:
        return cls(
            doc["_id"], doc["t"], doc.get("url"), doc.get("version"), bytes(doc["raw"]),
            doc.get("g"), doc.get("n", 0), doc.get("ids", []), doc.get("supplements"),
        )


@dataclass(slots=True)
class ConceptCriteria:
    """A typed concept query, compiled here into a MongoDB filter (values stay data)."""

    codes: Sequence[str] | None = None
    self_or_descendant_of: str | None = None
    descendant_of: str | None = None
    child_of: str | None = None
    not_self_or_descendant_of: str | None = None
    property_in: list[tuple[str, list[str]]] = field(default_factory=list)
    property_not_in: list[tuple[str, list[str]]] = field(default_factory=list)
    property_exists: list[tuple[str, bool]] = field(default_factory=list)
    word_prefixes: list[str] = field(default_factory=list)
    active_only: bool = False

    def compile(self, generation: str) -> dict[str, Any]:
        clauses: list[dict[str, Any]] = [{"g": generation}]
        if self.codes is not None:
            clauses.append({"c": {"$in": list(self.codes)}})
        if self.self_or_descendant_of is not None:
            v = self.self_or_descendant_of
            clauses.append({"$or": [{"c": v}, {"anc": v}]})
        if self.descendant_of is not None:
            clauses.append({"anc": self.descendant_of})
        if self.child_of is not None:
            clauses.append({"par": self.child_of})
        if self.not_self_or_descendant_of is not None:
            v = self.not_self_or_descendant_of
            clauses.append({"c": {"$ne": v}, "anc": {"$ne": v}})
        for prop, values in self.property_in:
            clauses.append({"pv": {"$in": [f"{prop}={v}" for v in values]}})
        for prop, values in self.property_not_in:
            clauses.append({"pv": {"$nin": [f"{prop}={v}" for v in values]}})
        for prop, exists in self.property_exists:
            clauses.append({"pk": prop} if exists else {"pk": {"$ne": prop}})
        for word in self.word_prefixes:
            clauses.append({"w": {"$regex": "^" + re.escape(word)}})
        if self.active_only:
            clauses.append({"act": True})
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class TerminologyStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.canonicals = store[CANONICALS]
        self.concepts = store[CONCEPTS]
        self.mappings = store[MAPPINGS]

    # --- definitions ----------------------------------------------------------------------

    async def put_definition(self, session: AsyncClientSession | None, canonical: Canonical) -> None:
        await self.canonicals.replace_one(
            {"_id": canonical.key}, canonical.document(), upsert=True, session=session
        )

    async def definition(self, key: str, session: AsyncClientSession | None = None) -> Canonical | None:
        doc = await find_first(self.canonicals, {"_id": key}, session=session)
        return Canonical.from_document(doc) if doc else None

    async def remove_definition(self, session: AsyncClientSession | None, key: str) -> None:
        await self.canonicals.delete_one({"_id": key}, session=session)

    async def code_system_versions(self) -> dict[str, list[str]]:
        """Every stored code system's URL with its versions (for TerminologyCapabilities)."""
        found: dict[str, list[str]] = {}
        async for doc in self.canonicals.find({"t": "CodeSystem", "url": {"$ne": None}}, {"url": 1, "version": 1}):
            versions = found.setdefault(doc["url"], [])
            if doc.get("version") and doc["version"] not in versions:
                versions.append(doc["version"])
        return found

    async def definitions(self, type_: str, url: str) -> list[Canonical]:
        """Every stored version of the definition with this canonical URL."""
        cursor = self.canonicals.find({"t": type_, "url": url})
        return [Canonical.from_document(doc) async for doc in cursor]

    async def definitions_with_concept(
        self, type_: str, url: str, code: str
    ) -> list[tuple[Canonical, dict[str, Any] | None]]:
        """Every version of a code system with its concept `code` (if it has it), in one
        round trip: what $lookup and $validate-code need first."""
        pipeline: list[dict[str, Any]] = [
            {"$match": {"t": type_, "url": url}},
            {"$lookup": {
                "from": CONCEPTS.name, "localField": "g", "foreignField": "g",
                "pipeline": [{"$match": {"c": code}}], "as": "hit",
            }},
        ]
        cursor = await self.canonicals.aggregate(pipeline)
        return [(Canonical.from_document(doc), (doc.get("hit") or [None])[0]) async for doc in cursor]

    async def definitions_by_identifier(self, type_: str, identifier: str) -> list[Canonical]:
        cursor = self.canonicals.find({"t": type_, "ids": identifier})
        return [Canonical.from_document(doc) async for doc in cursor]

    async def generation_in_use(self, generation: str) -> bool:
        return await self.canonicals.find_one({"g": generation}, {"_id": 1}) is not None

    # --- concepts -------------------------------------------------------------------------

    async def insert_concepts(
        self, session: AsyncClientSession | None, documents: Iterable[dict[str, Any]]
    ) -> int:
        """Insert concept documents (each carrying its `g`), in batches."""
        count = 0
        batch: list[dict[str, Any]] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) >= BULK_BATCH:
                await self.concepts.insert_many(batch, ordered=False, session=session)
                count += len(batch)
                batch = []
        if batch:
            await self.concepts.insert_many(batch, ordered=False, session=session)
            count += len(batch)
        return count

    async def delete_concepts(self, session: AsyncClientSession | None, generation: str) -> None:
        await self.concepts.delete_many({"g": generation}, session=session)

    async def concept(self, generation: str, code: str) -> dict[str, Any] | None:
        return await find_first(self.concepts, {"g": generation, "c": code})

    async def concepts_by_lower_code(self, generation: str, lower: str) -> list[dict[str, Any]]:
        return [doc async for doc in self.concepts.find({"g": generation, "lc": lower})]

    async def find_concepts(
        self,
        generation: str,
        criteria: ConceptCriteria,
        skip: int = 0,
        limit: int = 0,
        fields: dict[str, int] | None = None,
    ) -> list[dict[str, Any]]:
        cursor = self.concepts.find(
            criteria.compile(generation), fields, sort=[("o", ASCENDING)], skip=skip, limit=limit
        )
        return [doc async for doc in cursor]

    async def count_concepts(self, generation: str, criteria: ConceptCriteria) -> int:
        return await self.concepts.count_documents(criteria.compile(generation))

    async def current_ids(self, type_: str) -> list[str]:
        """Ids of the live resources of a type (for re-applying mappings to stored data)."""
        cursor = self.store[RESOURCES].find({"t": type_, "deleted": False}, {"_id": 1})
        return [doc["_id"].split("/", 1)[1] async for doc in cursor]

    # --- concept maps ---------------------------------------------------------------------

    async def insert_mappings(
        self, session: AsyncClientSession | None, generation: str, rows: list[dict[str, Any]]
    ) -> None:
        for start in range(0, len(rows), BULK_BATCH):
            batch = [{**row, "g": generation} for row in rows[start : start + BULK_BATCH]]
            await self.mappings.insert_many(batch, ordered=False, session=session)

    async def delete_mappings(self, session: AsyncClientSession | None, generation: str) -> None:
        await self.mappings.delete_many({"g": generation}, session=session)

    async def mappings_from(self, system: str, code: str) -> list[dict[str, Any]]:
        return [doc async for doc in self.mappings.find({"ss": system, "sc": code}, {"_id": 0})]

    async def normalization_rows(self, codes: dict[str, set[str]]) -> list[dict[str, Any]]:
        """The rows of normalization ConceptMaps from any of `codes` (system -> codes):
        a query per system, and per QUERY_CODES of its codes."""
        rows: list[dict[str, Any]] = []
        for system, some in codes.items():
            ordered = sorted(some)
            for start in range(0, len(ordered), QUERY_CODES):
                query = {"n": True, "ss": system, "sc": {"$in": ordered[start:start + QUERY_CODES]}}
                rows += [doc async for doc in self.mappings.find(query, {"_id": 0})]
        return rows

    async def mappings_to(self, system: str, code: str) -> list[dict[str, Any]]:
        return [doc async for doc in self.mappings.find({"ts": system, "tc": code}, {"_id": 0})]

    # --- $closure tables ------------------------------------------------------------------

    async def closure(self, session: AsyncClientSession, name: str) -> dict[str, Any] | None:
        """A closure table: `v` (its version), `concepts` ([system, code]), `rows` (added
        [version, system, child, parent])."""
        return await self.store[CLOSURES].find_one({"_id": name}, session=session)

    async def put_closure(self, session: AsyncClientSession, name: str, table: dict[str, Any]) -> None:
        await self.store[CLOSURES].replace_one({"_id": name}, {**table, "_id": name}, upsert=True, session=session)
