"""Keeping the engine's tables in step with CodeSystem, ValueSet, ConceptMap and
NamingSystem resources.

`after_write` joins the FHIR write path (interactions.HOOKS.after_write): inside the
same transaction as the stored version, it replaces the definition's row in
`tx_canonicals`, the concepts of an inline CodeSystem and the rows of a ConceptMap. A
definition written or deleted through the FHIR API is therefore in effect for the very
next request, on every server process, and never half-applied.

Code systems too large for one transaction (LOINC, SNOMED CT) are bulk-loaded by the
loaders under a fresh generation; their CodeSystem resource carries that generation in
the `GENERATION_EXTENSION` extension and `content = not-present`, so the hook only
switches the pointer, and the loader purges the previous generation afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from server.config import Settings
from server.fhir import capability, interactions, jsonio
from server.fhir.search import terminology as search_terminology
from server.store.database import Store
from server.store.fhir import NewVersion
from server.store.terminology import Canonical, TerminologyStore
from terminology.capabilities import terminology_capabilities
from terminology.conceptmaps import mapping_rows
from terminology.concepts import flatten
from terminology.normalization import Normalizer, incoming_hook
from terminology.search import SearchTerminology

TYPES = frozenset({"CodeSystem", "ValueSet", "ConceptMap", "NamingSystem"})
GENERATION_EXTENSION = "https://kuroshio.dev/fhir/StructureDefinition/concepts-generation"


def loaded_generation(resource: dict[str, Any]) -> str | None:
    for extension in resource.get("extension", []):
        if extension.get("url") == GENERATION_EXTENSION:
            return str(extension.get("valueString"))
    return None


def identifiers(resource: dict[str, Any]) -> list[str]:
    """Other names the definition answers to: identifier values (OIDs) and NamingSystem ids."""
    found = [str(i["value"]) for i in resource.get("identifier", []) if isinstance(i, dict) and i.get("value")]
    found += [str(u["value"]) for u in resource.get("uniqueId", []) if isinstance(u, dict) and u.get("value")]
    return found


def inline_generation(key: str, version: int) -> str:
    return f"{key}@{version}"


async def after_write(tstore: TerminologyStore, session: AsyncClientSession, new: NewVersion) -> None:
    if new.type not in TYPES:
        return
    previous = await tstore.definition(new.key, session)
    if previous is not None:
        if previous.generation and previous.generation.startswith(new.key + "@"):
            await tstore.delete_concepts(session, previous.generation)
        if previous.type == "ConceptMap":
            await tstore.delete_mappings(session, new.key)
        await tstore.remove_definition(session, new.key)
    if new.body is None:
        return
    resource = jsonio.loads(new.body)
    canonical = Canonical(
        new.key, new.type, resource.get("url"), resource.get("version"), new.body,
        identifiers=identifiers(resource),
    )
    if new.type == "NamingSystem":
        canonical.url = next((u["value"] for u in resource.get("uniqueId", []) if u.get("type") == "uri"), None)
    if new.type == "CodeSystem":
        await _code_system(tstore, session, new, resource, canonical)
    if new.type == "ConceptMap":
        await tstore.insert_mappings(session, new.key, mapping_rows(resource))
    await tstore.put_definition(session, canonical)


async def _code_system(
    tstore: TerminologyStore, session: AsyncClientSession, new: NewVersion, resource: dict[str, Any], canonical: Canonical
) -> None:
    if resource.get("content") == "supplement":
        canonical.supplements = str(resource.get("supplements", "")).partition("|")[0] or None
        return
    header = {k: v for k, v in resource.items() if k != "concept"}
    canonical.body = jsonio.dumps(header)
    generation = loaded_generation(resource)
    if generation is not None:
        canonical.generation = generation
        canonical.count = int(resource.get("count", 0))
        return
    canonical.generation = inline_generation(new.key, new.version)
    rows = flatten(resource)
    canonical.count = await tstore.insert_concepts(session, (r.document(canonical.generation) for r in rows))


_installed: list[Any] = []


@dataclass(frozen=True)
class Service:
    """What the operations need from start-up: the tables and the configured limits."""

    store: TerminologyStore
    expansion_limit: int


def install(store: Store, settings: Settings) -> Service:
    """Join the FHIR write path: definitions after each write, normalization before
    validation (idempotent: a new app replaces the previous hooks); give search the
    engine for its terminology modifiers."""
    tstore = TerminologyStore(store)

    async def hook(session: AsyncClientSession, new: NewVersion) -> None:
        await after_write(tstore, session, new)

    for old in _installed:
        for hooks in (interactions.HOOKS.after_write, interactions.HOOKS.incoming):
            if old in hooks:
                hooks.remove(old)
    _installed[:] = [hook]
    interactions.HOOKS.after_write.append(hook)
    if settings.terminology_normalize:
        normalize = incoming_hook(Normalizer(tstore, tuple(settings.terminology_targets)))
        _installed.append(normalize)
        interactions.HOOKS.incoming.append(normalize)

    async def statement(services: dict[str, Any], base: str) -> dict[str, Any]:
        return await terminology_capabilities(tstore, base, interactions.instant(interactions.now()))

    capability.OTHER_MODES["terminology"] = statement
    search_terminology.install(SearchTerminology(store))  # :in, :not-in, :above, :below
    return Service(tstore, settings.terminology_expansion_limit)
