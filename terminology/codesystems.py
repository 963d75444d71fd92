"""Code system versions and where their concepts come from.

A `CodeSystemVersion` pairs a CodeSystem's header (url, version, content, properties)
with a `ConceptSource`: `StoredConcepts` reads MongoDB (code systems written through the
FHIR API or bulk-loaded), `InlineConcepts` holds the rows of a CodeSystem sent with the
request (`tx-resource`) or of a small built-in one. Both answer the same questions with
the same `ConceptCriteria`, so the operations never care which one they have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from server.store.terminology import ConceptCriteria, TerminologyStore
from terminology.concepts import Concept, flatten, words

Test = Callable[[Concept], bool]


def criteria_accepts(criteria: ConceptCriteria, concept: Concept) -> bool:
    """The in-memory reading of a ConceptCriteria (ConceptCriteria.compile is the MongoDB one)."""
    if criteria.codes is not None and concept.code not in criteria.codes:
        return False
    if criteria.self_or_descendant_of is not None:
        v = criteria.self_or_descendant_of
        if concept.code != v and v not in concept.ancestors:
            return False
    if criteria.descendant_of is not None and criteria.descendant_of not in concept.ancestors:
        return False
    if criteria.child_of is not None and criteria.child_of not in concept.parents:
        return False
    if criteria.not_self_or_descendant_of is not None:
        v = criteria.not_self_or_descendant_of
        if concept.code == v or v in concept.ancestors:
            return False
    for prop, values in criteria.property_in:
        if not set(concept.property_texts(prop)) & set(values):
            return False
    for prop, values in criteria.property_not_in:
        if set(concept.property_texts(prop)) & set(values):
            return False
    for prop, exists in criteria.property_exists:
        if bool(concept.values(prop)) != exists:
            return False
    if criteria.word_prefixes:
        have = words(concept.display, *(d.get("value") for d in concept.designations))
        if not all(any(w.startswith(p) for w in have) for p in criteria.word_prefixes):
            return False
    if criteria.active_only and concept.inactive:
        return False
    return True


class ConceptSource(Protocol):
    async def get(self, code: str) -> Concept | None: ...

    async def get_ignoring_case(self, code: str) -> Concept | None: ...

    async def select(
        self, criteria: ConceptCriteria, tests: list[Test], skip: int = 0, limit: int = 0
    ) -> list[Concept]: ...

    async def count(self, criteria: ConceptCriteria, tests: list[Test]) -> int: ...


class InlineConcepts:
    """Concept rows held in memory (a CodeSystem that came with the request)."""

    def __init__(self, rows: list[Concept]) -> None:
        self.rows = sorted(rows, key=lambda r: r.order)
        self.by_code = {r.code: r for r in self.rows}

    async def get(self, code: str) -> Concept | None:
        return self.by_code.get(code)

    async def get_ignoring_case(self, code: str) -> Concept | None:
        lower = code.lower()
        return next((r for r in self.rows if r.code.lower() == lower), None)

    def _matching(self, criteria: ConceptCriteria, tests: list[Test]) -> list[Concept]:
        return [r for r in self.rows if criteria_accepts(criteria, r) and all(t(r) for t in tests)]

    async def select(
        self, criteria: ConceptCriteria, tests: list[Test], skip: int = 0, limit: int = 0
    ) -> list[Concept]:
        found = self._matching(criteria, tests)
        return found[skip : skip + limit] if limit else found[skip:]

    async def count(self, criteria: ConceptCriteria, tests: list[Test]) -> int:
        return len(self._matching(criteria, tests))


class StoredConcepts:
    """Concept rows in MongoDB under one generation (indexed; never loaded whole).

    `prefetched` holds concepts fetched together with the code system's definition
    (code -> document, or None when the code system does not have it)."""

    def __init__(self, store: TerminologyStore, generation: str, prefetched: dict[str, dict[str, Any] | None] | None = None) -> None:
        self.store = store
        self.generation = generation
        self.prefetched = prefetched or {}

    async def get(self, code: str) -> Concept | None:
        doc = self.prefetched[code] if code in self.prefetched else await self.store.concept(self.generation, code)
        return Concept.from_document(doc) if doc else None

    async def get_ignoring_case(self, code: str) -> Concept | None:
        docs = await self.store.concepts_by_lower_code(self.generation, code.lower())
        return Concept.from_document(docs[0]) if docs else None

    async def select(
        self, criteria: ConceptCriteria, tests: list[Test], skip: int = 0, limit: int = 0
    ) -> list[Concept]:
        if not tests:
            docs = await self.store.find_concepts(self.generation, criteria, skip, limit)
            return [Concept.from_document(d) for d in docs]
        docs = await self.store.find_concepts(self.generation, criteria)
        found = [c for c in map(Concept.from_document, docs) if all(t(c) for t in tests)]
        return found[skip : skip + limit] if limit else found[skip:]

    async def count(self, criteria: ConceptCriteria, tests: list[Test]) -> int:
        if not tests:
            return await self.store.count_concepts(self.generation, criteria)
        return len(await self.select(criteria, tests))


class SupplementedConcepts:
    """A source whose concepts gain the designations, properties and extensions that
    CodeSystem supplements add (only when a request or value set asks for them)."""

    def __init__(self, source: ConceptSource, supplements: list[dict[str, Any]]) -> None:
        self.source = source
        self.extra: dict[str, list[dict[str, Any]]] = {}
        for supplement in supplements:
            for row in flatten(supplement):
                self.extra.setdefault(row.code, []).append(
                    {"designation": row.designations, "property": row.properties, "extension": row.extensions}
                )

    def apply(self, concept: Concept | None) -> Concept | None:
        if concept is None or concept.code not in self.extra:
            return concept
        merged = replace(concept, designations=list(concept.designations), properties=list(concept.properties), extensions=list(concept.extensions))
        for extra in self.extra[concept.code]:
            merged.designations += extra["designation"]
            merged.properties += extra["property"]
            merged.extensions += extra["extension"]
        return merged

    async def get(self, code: str) -> Concept | None:
        return self.apply(await self.source.get(code))

    async def get_ignoring_case(self, code: str) -> Concept | None:
        return self.apply(await self.source.get_ignoring_case(code))

    async def select(
        self, criteria: ConceptCriteria, tests: list[Test], skip: int = 0, limit: int = 0
    ) -> list[Concept]:
        return [c for c in map(self.apply, await self.source.select(criteria, tests, skip, limit)) if c is not None]

    async def count(self, criteria: ConceptCriteria, tests: list[Test]) -> int:
        return await self.source.count(criteria, tests)


@dataclass
class CodeSystemVersion:
    """One version of a code system: its header and its concepts."""

    resource: dict[str, Any]  # the CodeSystem without `concept`
    source: ConceptSource
    supplements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.resource.get("url", ""))

    @property
    def version(self) -> str | None:
        return self.resource.get("version")

    @property
    def content(self) -> str:
        return str(self.resource.get("content", "complete"))

    @property
    def case_sensitive(self) -> bool:
        return self.resource.get("caseSensitive", True) is not False

    @property
    def name(self) -> str | None:
        return self.resource.get("name")

    @property
    def language(self) -> str | None:
        return self.resource.get("language")

    def versioned(self) -> str:
        return f"{self.url}|{self.version}" if self.version else self.url

    async def find(self, code: str) -> Concept | None:
        """The concept with this code (case-insensitively where the system says so)."""
        concept = await self.source.get(code)
        if concept is None and not self.case_sensitive:
            concept = await self.source.get_ignoring_case(code)
        return concept


def inline_version(resource: dict[str, Any]) -> CodeSystemVersion:
    header = {k: v for k, v in resource.items() if k != "concept"}
    return CodeSystemVersion(header, InlineConcepts(flatten(resource)))
