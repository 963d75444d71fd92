"""CodeSystem/$lookup and CodeSystem/$subsumes.

$lookup answers a code's name, version, display, definition, designations and
properties (all of them for `property=*`, else those asked for; `parent` and `child`
come from the hierarchy). $subsumes compares two codes by the is-a closure.
"""

from __future__ import annotations

from typing import Any

from server.store.terminology import ConceptCriteria
from terminology.codesystems import CodeSystemVersion
from terminology.concepts import Concept
from terminology.languages import display_for, preferred
from terminology.outcomes import tx_error


def _wanted(properties: list[str], code: str) -> bool:
    return not properties or "*" in properties or code in properties


def _asked(properties: list[str], code: str) -> bool:
    """Hierarchy properties cost extra queries: only when asked for (or `*`)."""
    return "*" in properties or code in properties


def _property(code: str, value: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"name": "code", "valueCode": code}, {"name": "value", **value}]
    if description:
        parts.append({"name": "description", "valueString": description})
    return {"name": "property", "part": parts}


async def lookup(cs: CodeSystemVersion, concept: Concept, properties: list[str], languages: list[str]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if cs.name:
        parameters.append({"name": "name", "valueString": cs.name})
    parameters.append({"name": "code", "valueCode": concept.code})
    parameters.append({"name": "system", "valueUri": cs.url})
    if cs.version:
        parameters.append({"name": "version", "valueString": cs.version})
    display = display_for(cs, concept, languages)
    if display:
        parameters.append({"name": "display", "valueString": display})
    if concept.definition:
        parameters.append({"name": "definition", "valueString": concept.definition})
    parameters.append({"name": "abstract", "valueBoolean": concept.abstract})
    designations = [preferred(cs, concept.display)] if concept.display else []
    for designation in [*designations, *concept.designations]:
        parts: list[dict[str, Any]] = []
        if designation.get("language"):
            parts.append({"name": "language", "valueCode": designation["language"]})
        if designation.get("use"):
            use = dict(designation["use"])
            use.setdefault("display", use.get("code"))
            parts.append({"name": "use", "valueCoding": use})
        parts.append({"name": "value", "valueString": designation.get("value")})
        parameters.append({"name": "designation", "part": parts})
    if _wanted(properties, "inactive"):
        parameters.append(_property("inactive", {"valueBoolean": concept.inactive}))
    for prop in concept.properties:
        code = str(prop.get("code"))
        if code in ("parent", "child") or not _wanted(properties, code):
            continue
        parameters.append(_property(code, {k: v for k, v in prop.items() if k.startswith("value")}))
    if concept.parents and _asked(properties, "parent"):
        found = {c.code: c for c in await cs.source.select(ConceptCriteria(codes=concept.parents), [])}
        for parent in concept.parents:
            parameters.append(_property("parent", {"valueCode": parent}, found[parent].display if parent in found else None))
    if _asked(properties, "child"):
        for child in await cs.source.select(ConceptCriteria(child_of=concept.code), []):
            parameters.append(_property("child", {"valueCode": child.code}, child.display))
    return {"resourceType": "Parameters", "parameter": parameters}


async def subsumes(cs: CodeSystemVersion, code_a: str, code_b: str) -> dict[str, Any]:
    a = await cs.find(code_a)
    b = await cs.find(code_b)
    for code, concept in ((code_a, a), (code_b, b)):
        if concept is None:
            version = f" version '{cs.version}'" if cs.version else ""
            raise tx_error(
                400, "invalid", f"Unknown code '{code}' in the CodeSystem '{cs.url}'{version}", "invalid-code"
            )
    assert a is not None and b is not None
    if a.code == b.code:
        outcome = "equivalent"
    elif a.code in b.ancestors:
        outcome = "subsumes"
    elif b.code in a.ancestors:
        outcome = "subsumed-by"
    else:
        outcome = "not-subsumed"
    return {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": outcome}]}
