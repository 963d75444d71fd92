"""Resolving canonical URLs to definitions for one request.

Definitions come first from the resources sent with the request (`tx-resource`, as the
HL7 terminology test runner and validators send them), then from the store. When no
version is asked for, the highest version wins; a request-local cache keeps one
request from resolving the same URL twice (nothing outlives the request).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from server.fhir import jsonio
from server.store.terminology import Canonical, TerminologyStore
from terminology.builtin import builtin_code_system
from terminology.codesystems import CodeSystemVersion, StoredConcepts, SupplementedConcepts, inline_version
from terminology.outcomes import tx_error

_NUMBER = re.compile(r"(\d+)")


def version_key(version: str | None) -> tuple[Any, ...]:
    """Order versions naturally (1.10 after 1.9; dates compare as numbers)."""
    if version is None:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _NUMBER.split(version) if p)


def split_canonical(value: str) -> tuple[str, str | None]:
    url, _, version = value.partition("|")
    return url, version or None


def version_matches(wanted: str | None, actual: str | None) -> bool:
    """Exact match, or a wildcard/partial version (`1.x`, `1`) matching by prefix."""
    if wanted is None:
        return True
    if actual is None:
        return False
    if wanted == actual:
        return True
    parts = wanted.split(".")
    if parts[-1] in ("x", "X", "*"):
        parts = parts[:-1]
    actual_parts = actual.split(".")
    return len(parts) < len(actual_parts) and actual_parts[: len(parts)] == parts


def pick(candidates: list[Any], version: str | None, version_of: Any) -> Any | None:
    matching = [c for c in candidates if version_matches(version, version_of(c))]
    if not matching:
        return None
    return max(matching, key=lambda c: version_key(version_of(c)))


STANDARDS_STATUS = "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status"


def standards_status(resource: dict[str, Any]) -> str | None:
    """deprecated/withdrawn (standards status), draft, or experimental; None when unremarkable."""
    for extension in resource.get("extension", []):
        if extension.get("url") == STANDARDS_STATUS and extension.get("valueCode") in ("deprecated", "withdrawn"):
            return str(extension["valueCode"])
    if resource.get("status") == "draft":
        return "draft"
    if resource.get("experimental") is True:
        return "experimental"
    return None


def implicit_value_set(url: str) -> dict[str, Any] | None:
    """The implicit value sets of a code system: `[system]?fhir_vs` (all codes) and
    `[system]?fhir_vs=isa/[code]` (a concept and its descendants), as SNOMED CT and
    LOINC define them."""
    system, _, query = url.partition("?fhir_vs")
    include: dict[str, Any] = {"system": system}
    if query.startswith("=isa/") and len(query) > 5:
        include["filter"] = [{"property": "concept", "op": "is-a", "value": query[5:]}]
    elif query:
        return None
    return {"resourceType": "ValueSet", "url": url, "status": "active", "compose": {"include": [include]}}


@dataclass
class Context:
    store: TerminologyStore | None
    tx_resources: list[dict[str, Any]] = field(default_factory=list)
    _code_systems: dict[tuple[str, str | None], CodeSystemVersion | None] = field(default_factory=dict)
    # resources contained in the value set being worked on (`#id` references)
    contained: list[dict[str, Any]] = field(default_factory=list)
    # supplements the request or value set asked for (applied to the systems they supplement)
    supplements: list[dict[str, Any]] = field(default_factory=list)
    # canonical -> notable status (draft, experimental, deprecated, withdrawn) of what was used
    notes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def note(self, resource: dict[str, Any]) -> None:
        """Remember a definition whose status users should be told about."""
        status = standards_status(resource)
        if resource.get("resourceType") == "ValueSet" and status not in ("deprecated", "withdrawn"):
            return
        if status is not None and resource.get("url"):
            url = resource["url"]
            canonical = f"{url}|{resource['version']}" if resource.get("version") else url
            self.notes[canonical] = (str(resource.get("resourceType")), status)

    def local(self, type_: str, url: str) -> list[dict[str, Any]]:
        return [r for r in self.tx_resources if r.get("resourceType") == type_ and r.get("url") == url]

    async def stored(self, type_: str, url: str) -> list[Canonical]:
        if self.store is None:
            return []
        found = await self.store.definitions(type_, url)
        if not found:
            found = await self.store.definitions_by_identifier(type_, url)
        if not found and type_ == "CodeSystem":
            # another name for the system (an OID, say) recorded by a NamingSystem
            for naming in await self.store.definitions_by_identifier("NamingSystem", url):
                if naming.url and naming.url != url:
                    found = await self.store.definitions(type_, naming.url)
                    if found:
                        break
        return found

    async def resource(self, type_: str, url: str, version: str | None = None) -> dict[str, Any] | None:
        """A ValueSet, ConceptMap or NamingSystem by canonical URL (and version)."""
        if version is None and "|" in url:
            url, version = split_canonical(url)
        if type_ == "ValueSet" and "?fhir_vs" in url:
            return implicit_value_set(url)
        if url.startswith("#"):
            return next((r for r in self.contained if r.get("resourceType") == type_ and r.get("id") == url[1:]), None)
        found = pick(self.local(type_, url), version, lambda r: r.get("version"))
        if found is None:
            stored = pick(await self.stored(type_, url), version, lambda c: c.version)
            found = jsonio.loads(stored.body) if stored is not None else None
        if found is not None:
            self.note(found)
        return found

    async def versions_of(self, type_: str, url: str) -> list[str]:
        local = [r.get("version") for r in self.local(type_, url)]
        stored = [c.version for c in await self.stored(type_, url)]
        return [v for v in local + stored if v]

    async def code_system(self, url: str, version: str | None = None, code: str | None = None) -> CodeSystemVersion | None:
        """The code system version; `code` names a concept to fetch in the same round trip."""
        if version is None and "|" in url:
            url, version = split_canonical(url)
        key = (url, version)
        if key not in self._code_systems:
            cs = await self._resolve_code_system(url, version, code)
            if cs is not None:
                self.note(cs.resource)
                cs = self._supplemented(cs)
            self._code_systems[key] = cs
        return self._code_systems[key]

    async def _resolve_code_system(self, url: str, version: str | None, code: str | None) -> CodeSystemVersion | None:
        local = pick(
            [r for r in self.local("CodeSystem", url) if r.get("content") != "supplement"],
            version, lambda r: r.get("version"),
        )
        if local is not None:
            return inline_version(local)
        hits: dict[str, dict[str, Any] | None] = {}
        if self.store is not None and code is not None:
            found = await self.store.definitions_with_concept("CodeSystem", url, code)
            candidates = [c for c, _ in found] or await self.stored("CodeSystem", url)
            hits = {c.key: hit for c, hit in found}
        else:
            candidates = await self.stored("CodeSystem", url)
        stored = pick([c for c in candidates if c.supplements is None], version, lambda c: c.version)
        if stored is not None and self.store is not None:
            header = jsonio.loads(stored.body)
            if stored.generation is None:
                return inline_version(header)
            prefetched = {code: hits[stored.key]} if code is not None and stored.key in hits else None
            return CodeSystemVersion(
                {k: v for k, v in header.items() if k != "concept"},
                StoredConcepts(self.store, stored.generation, prefetched),
            )
        return builtin_code_system(url, version)

    def _supplemented(self, cs: CodeSystemVersion) -> CodeSystemVersion:
        own = [s for s in self.supplements if split_canonical(str(s.get("supplements", "")))[0] == cs.url]
        if not own:
            return cs
        header = dict(cs.resource)
        header["property"] = [*cs.resource.get("property", []), *(p for s in own for p in s.get("property", []))]
        return CodeSystemVersion(header, SupplementedConcepts(cs.source, own), own)

    async def require_supplements(self, references: list[str]) -> None:
        """Resolve the supplements asked for; a missing one is an error, as the spec says."""
        for reference in references:
            found = await self.supplement(reference)
            if found is None:
                raise tx_error(404, "not-found", f"Required supplement not found: {reference}", "not-found")
            self.supplements.append(found)
        self._code_systems.clear()

    async def supplement(self, url: str, version: str | None = None) -> dict[str, Any] | None:
        """A CodeSystem supplement by its own canonical URL."""
        if version is None and "|" in url:
            url, version = split_canonical(url)
        local = pick(
            [r for r in self.local("CodeSystem", url) if r.get("content") == "supplement"],
            version, lambda r: r.get("version"),
        )
        if local is not None:
            return local
        stored = pick([c for c in await self.stored("CodeSystem", url) if c.supplements], version, lambda c: c.version)
        return jsonio.loads(stored.body) if stored is not None else None

    async def is_value_set(self, url: str) -> bool:
        return await self.resource("ValueSet", url) is not None
