"""Code systems that are grammars rather than lists: UCUM.

UCUM (http://unitsofmeasure.org) defines an infinite set of unit expressions, so it is
not loaded as rows: a code is valid when ucumvert (a maintained UCUM parser with a pint
interface) parses it, and its canonical form is pint's base-unit reduction. Expanding
UCUM is possible only for enumerated codes, as for every grammar-based system.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from server.store.terminology import ConceptCriteria
from terminology.codesystems import CodeSystemVersion, Test
from terminology.concepts import Concept

UCUM = "http://unitsofmeasure.org"
UCUM_VERSION = "2.1"


@cache
def _ucum() -> tuple[Any, Any]:
    from ucumvert import PintUcumRegistry, get_ucum_parser

    return get_ucum_parser(), PintUcumRegistry()


def ucum_valid(code: str) -> bool:
    parser, _ = _ucum()
    try:
        parser.parse(code)
    except Exception:  # lark raises several error types for malformed input
        return False
    return True


def ucum_canonical(code: str) -> str | None:
    """The unit reduced to base units (`mg/dL` -> `1e-05 kilogram / meter ** 3`)."""
    _, registry = _ucum()
    try:
        quantity = registry.from_ucum(code).to_base_units()
    except Exception:  # units pint cannot reduce (arbitrary units like [IU])
        return None
    return f"{quantity.magnitude:g} {quantity.units}"


class UcumConcepts:
    async def get(self, code: str) -> Concept | None:
        if not code or not ucum_valid(code):
            return None
        properties = []
        canonical = ucum_canonical(code)
        if canonical is not None:
            properties.append({"code": "canonical", "valueString": canonical})
        return Concept(code=code, display=code, properties=properties)

    async def get_ignoring_case(self, code: str) -> Concept | None:
        return None

    async def select(
        self, criteria: ConceptCriteria, tests: list[Test], skip: int = 0, limit: int = 0
    ) -> list[Concept]:
        found = []
        for code in criteria.codes or []:
            concept = await self.get(code)
            if concept is not None and all(t(concept) for t in tests):
                found.append(concept)
        return found[skip : skip + limit] if limit else found[skip:]

    async def count(self, criteria: ConceptCriteria, tests: list[Test]) -> int:
        return len(await self.select(criteria, tests))


def builtin_code_system(url: str, version: str | None) -> CodeSystemVersion | None:
    if url == UCUM and version in (None, UCUM_VERSION):
        header = {
            "resourceType": "CodeSystem",
            "url": UCUM,
            "version": UCUM_VERSION,
            "name": "UCUM",
            "title": "Unified Code for Units of Measure",
            "status": "active",
            "content": "not-present",
            "caseSensitive": True,
            "property": [{"code": "canonical", "type": "string"}],
        }
        return CodeSystemVersion(header, UcumConcepts())
    return None
