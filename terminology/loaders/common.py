"""What every loader shares: writing definitions through the FHIR API, and bulk-loading
the concepts of a large code system.

Small definitions are written with the FHIR `update` interaction (PUT by id), so they are
validated, versioned and picked up by the after-write hook like any client's write.
A large code system's concepts are inserted in batches under a fresh generation, outside
any transaction (a full SNOMED CT does not fit in one); then its CodeSystem resource is
PUT with `content = not-present`, its concept count and that generation, which switches
every reader to the new concepts at once; the previous generation is purged last.

Loaders write through the FHIR write path, so the terminology hooks must be installed
(`terminology.definitions.install`), as `kuroshio serve` and `kuroshio terminology` do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from server.fhir import interactions
from server.fhir.outcome import FhirError
from server.store.database import Store
from server.store.fhir import FhirStore
from server.store.terminology import TerminologyStore
from terminology.concepts import Concept
from terminology.definitions import GENERATION_EXTENSION

# advance(by, total, description): a loader reports its progress through this
Progress = Callable[[int, int | None, str], None]


def no_progress(advance: int, total: int | None, description: str) -> None:
    """The default progress callback: report nothing."""


@dataclass
class LoadResult:
    resources: int = 0
    concepts: int = 0
    skipped: list[str] = field(default_factory=list)  # "Type/id: why"


async def put_resource(db: FhirStore, resource: dict[str, Any], result: LoadResult) -> None:
    """Create or update one resource by its id (through the FHIR write path)."""
    type_, id_ = resource.get("resourceType"), resource.get("id")
    if not isinstance(type_, str) or not isinstance(id_, str):
        result.skipped.append(f"{type_}/{id_}: no resourceType or id")
        return
    body = {k: v for k, v in resource.items() if k != "text"}
    try:
        await interactions.update(db, type_, id_, body, None)
    except FhirError as exc:
        result.skipped.append(f"{type_}/{id_}: {exc}")
        return
    result.resources += 1


async def bulk_code_system(
    store: Store,
    header: dict[str, Any],
    concepts: Iterable[Concept],
    total: int | None,
    progress: Progress = no_progress,
) -> LoadResult:
    """Load a large code system: concepts first (fresh generation), then the switch."""
    tstore = TerminologyStore(store)
    db = FhirStore(store)
    key = f"CodeSystem/{header['id']}"
    previous = await tstore.definition(key)
    generation = f"{key}#{uuid.uuid4().hex[:12]}"
    result = LoadResult()

    def documents() -> Iterable[dict[str, Any]]:
        for n, concept in enumerate(concepts, 1):
            if n % 1000 == 0:
                progress(1000, total, f"{header.get('name', key)} concepts")
            yield concept.document(generation)

    try:
        result.concepts = await tstore.insert_concepts(None, documents())
        resource = {k: v for k, v in header.items() if k != "concept"}
        resource["content"] = resource.get("content") if resource.get("content") in ("fragment", "example") else "not-present"
        resource["count"] = result.concepts
        resource["extension"] = [
            *[e for e in resource.get("extension", []) if e.get("url") != GENERATION_EXTENSION],
            {"url": GENERATION_EXTENSION, "valueString": generation},
        ]
        await put_resource(db, resource, result)
        if result.skipped:
            raise ValueError(f"the CodeSystem resource was refused: {result.skipped[-1]}")
    except BaseException:
        await tstore.delete_concepts(None, generation)
        raise
    if previous is not None and previous.generation and previous.generation != generation:
        if not await tstore.generation_in_use(previous.generation):
            await tstore.delete_concepts(None, previous.generation)
    return result

