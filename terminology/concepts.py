"""Concepts: the rows every code system is reduced to, wherever it comes from.

A CodeSystem resource (nested `concept` hierarchy, `parent`/`child` properties), a LOINC
release and a SNOMED CT RF2 snapshot all become the same `Concept` rows: code, display,
definition, designations, properties, parents and the transitive closure of ancestors.
The rows live in MongoDB for stored code systems and in memory for code systems sent
with a request (`tx-resource`); `matches` is the one definition of what a ValueSet
filter selects, used for both (MongoDB queries only narrow the candidates first).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bson import Binary

from server.fhir import jsonio

STATUS_URI = "http://hl7.org/fhir/concept-properties#status"
INACTIVE_URI = "http://hl7.org/fhir/concept-properties#inactive"
NOT_SELECTABLE_URI = "http://hl7.org/fhir/concept-properties#notSelectable"
STANDARDS_STATUS = "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status"
PARENT_CODES = ("parent", "subsumedBy")
INACTIVE_STATUSES = {"retired", "inactive"}
_WORD = re.compile(r"\w+", re.UNICODE)


def words(*texts: str | None) -> list[str]:
    """Lower-cased words of displays and designations, for the `filter` text search."""
    found: set[str] = set()
    for text in texts:
        if text:
            found.update(w.lower() for w in _WORD.findall(text))
    return sorted(found)


def property_value(prop: dict[str, Any]) -> Any:
    for key, value in prop.items():
        if key.startswith("value"):
            return value
    return None


def value_text(value: Any) -> str:
    """A property value as one string (a Coding as its code)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):  # Coding
        return str(value.get("code", ""))
    return str(value)


def value_texts(value: Any) -> list[str]:
    """The strings filters (`=`, `in`, regex) compare a value with: a Coding's code and display."""
    if isinstance(value, dict) and value.get("display"):
        return [value_text(value), str(value["display"])]
    return [value_text(value)]


@dataclass(slots=True)
class Concept:
    code: str
    display: str | None = None
    definition: str | None = None
    designations: list[dict[str, Any]] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    ancestors: list[str] = field(default_factory=list)
    order: int = 0
    inactive: bool = False
    abstract: bool = False
    status: str | None = None
    leaf: bool = True

    def values(self, code: str) -> list[Any]:
        return [property_value(p) for p in self.properties if p.get("code") == code]

    def property_texts(self, code: str) -> list[str]:
        if code in ("parent",):
            return list(self.parents)
        return [t for v in self.values(code) for t in value_texts(v)]

    # --- MongoDB form -------------------------------------------------------------------

    def document(self, generation: str) -> dict[str, Any]:
        detail = {
            "definition": self.definition,
            "designation": self.designations,
            "property": self.properties,
            "extension": self.extensions,
            "status": self.status,
        }
        return {
            "g": generation,
            "c": self.code,
            "lc": self.code.lower(),
            "d": self.display,
            "par": self.parents,
            "anc": self.ancestors,
            "o": self.order,
            "act": not self.inactive,
            "abs": self.abstract,
            "leaf": self.leaf,
            "pv": sorted({f"{p.get('code')}={t}" for p in self.properties for t in value_texts(property_value(p))}),
            "pk": sorted({str(p.get("code")) for p in self.properties}),
            "w": words(self.display, *(d.get("value") for d in self.designations)),
            "j": Binary(jsonio.dumps({k: v for k, v in detail.items() if v})),
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Concept:
        detail = jsonio.loads(bytes(doc["j"])) if doc.get("j") else {}
        return cls(
            doc["c"], doc.get("d"), detail.get("definition"), detail.get("designation", []),
            detail.get("property", []), detail.get("extension", []), doc.get("par", []),
            doc.get("anc", []), doc.get("o", 0), not doc.get("act", True), doc.get("abs", False),
            detail.get("status"), doc.get("leaf", True),
        )


def property_codes(resource: dict[str, Any]) -> dict[str, str]:
    """The code system's own codes for the standard concept properties, by their URI."""
    codes = {"status": "status", "inactive": "inactive", "notSelectable": "notSelectable"}
    for prop in resource.get("property", []):
        uri, code = prop.get("uri"), prop.get("code")
        if not code:
            continue
        if uri == STATUS_URI:
            codes["status"] = code
        elif uri == INACTIVE_URI:
            codes["inactive"] = code
        elif uri == NOT_SELECTABLE_URI:
            codes["notSelectable"] = code
    return codes


def _walk(concepts: list[dict[str, Any]], parent: str | None) -> Iterator[tuple[dict[str, Any], str | None]]:
    for concept in concepts:
        yield concept, parent
        yield from _walk(concept.get("concept", []), concept.get("code"))


def flatten(resource: dict[str, Any]) -> list[Concept]:
    """The rows of a CodeSystem resource's inline concepts, with the is-a closure."""
    codes = property_codes(resource)
    rows: dict[str, Concept] = {}
    for order, (concept, parent) in enumerate(_walk(resource.get("concept", []), None)):
        code = concept.get("code")
        if not isinstance(code, str) or code in rows:
            continue
        props = [p for p in concept.get("property", []) if isinstance(p, dict)]
        parents = [parent] if parent else []
        parents += [value_text(property_value(p)) for p in props if p.get("code") in PARENT_CODES]
        status_values = [value_text(property_value(p)) for p in props if p.get("code") == codes["status"]]
        status_values += [
            str(e.get("valueCode")) for e in concept.get("extension", [])
            if isinstance(e, dict) and e.get("url") == STANDARDS_STATUS and e.get("valueCode")
        ]
        status = status_values[0] if status_values else None
        inactive = any(
            property_value(p) is True for p in props if p.get("code") == codes["inactive"]
        ) or status in INACTIVE_STATUSES
        abstract = any(
            property_value(p) is True for p in props if p.get("code") == codes["notSelectable"]
        )
        rows[code] = Concept(
            code=code,
            display=concept.get("display"),
            definition=concept.get("definition"),
            designations=concept.get("designation", []),
            properties=props,
            extensions=concept.get("extension", []),
            parents=list(dict.fromkeys(parents)),
            order=order,
            inactive=inactive,
            abstract=abstract,
            status=status,
        )
    for prop_parent in [r for r in rows.values()]:
        for child in [value_text(property_value(p)) for p in prop_parent.properties if p.get("code") == "child"]:
            if child in rows and prop_parent.code not in rows[child].parents:
                rows[child].parents.append(prop_parent.code)
    close_hierarchy(rows)
    return list(rows.values())


def close_hierarchy(rows: dict[str, Concept]) -> None:
    """Fill `ancestors` (transitive closure of parents, cycles tolerated) and `leaf`."""
    memo: dict[str, list[str]] = {}

    def ancestors_of(code: str, seen: frozenset[str]) -> list[str]:
        if code in memo:
            return memo[code]
        result: dict[str, None] = {}
        row = rows.get(code)
        for parent in row.parents if row else []:
            if parent in seen:
                continue
            result[parent] = None
            for a in ancestors_of(parent, seen | {parent}):
                result[a] = None
        memo[code] = [a for a in result if a != code]
        return memo[code]

    for code, row in rows.items():
        row.ancestors = ancestors_of(code, frozenset({code}))
        for parent in row.parents:
            if parent in rows:
                rows[parent].leaf = False

