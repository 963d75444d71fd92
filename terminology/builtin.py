"""Code systems that are grammars rather than lists: UCUM.

UCUM (http://unitsofmeasure.org) defines an infinite set of unit expressions, so it is
not loaded as rows: a code is valid when ucumvert (a maintained UCUM parser with a pint
interface) parses it, and its canonical form is pint's base-unit reduction. Expanding
UCUM is possible only for enumerated codes, as for every grammar-based system.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from server.store.terminology import ConceptCriteria
from terminology.codesystems import CodeSystemVersion, Test
from terminology.concepts import Concept

UCUM = "http://unitsofmeasure.org"
UCUM_VERSION = "2.1"


@cache
def ucum_parser() -> Any:
    """ucumvert's UCUM grammar (lark): what says whether a code is UCUM."""
    from ucumvert import get_ucum_parser

    return get_ucum_parser()


@cache
def ucum_registry() -> Any:
    """ucumvert's registry (pint's units under UCUM's names), one per process for search
    (server/fhir/search/ucum.py) and terminology alike. Building it takes about a second and
    some 43,000 objects: start-up builds it (`load_ucum`) so that no request waits for it
    and so that it is frozen out of the garbage collector's full walks. Terminology once
    built a second one of its own, at the first UCUM lookup or check of a process."""
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


def load_ucum() -> None:
    """Build the grammar and the registry (start-up, in a thread)."""
    ucum_parser()
    ucum_registry()


# UCUM bounds no exponent, but pint computes `10*N` as the exact integer 10**N: a
# Quantity in `10*30000000` took a worker 42 s, and a larger one never returned. Units in
# use need small ones (10*12, m3, s-2), so a code with an exponent past 99 is refused as
# one this server cannot process, like a code that does not parse.
MAX_EXPONENT_DIGITS = 2
_DIGITS = re.compile(r"\d+")
_ANNOTATION = re.compile(r"\{[^}]*\}")


def _exponents(code: str) -> Iterator[str]:
    """The exponents of a UCUM code: the digits right after a unit symbol (`m2`, `10*-3`),
    not the factors (`/100`, the `10` of `10*`) nor annotations (`{2 cells}`)."""
    code = _ANNOTATION.sub("", code)
    for match in _DIGITS.finditer(code):
        before = code[: match.start()].rstrip("+-")[-1:]
        if before and before not in "./(":
            yield match.group()


def ucum_bounded(code: str) -> bool:
    """Whether every exponent of `code` is at most 99 (see MAX_EXPONENT_DIGITS)."""
    return all(len(exponent.lstrip("0")) <= MAX_EXPONENT_DIGITS for exponent in _exponents(code))


def ucum_valid(code: str) -> bool:
    if not ucum_bounded(code):
        return False
    try:
        ucum_parser().parse(code)
    except Exception:  # lark raises several error types for malformed input
        return False
    return True


def ucum_canonical(code: str) -> str | None:
    """The unit reduced to base units (`mg/dL` -> `1e-05 kilogram / meter ** 3`)."""
    try:
        quantity = ucum_registry().from_ucum(code).to_base_units()
        return f"{quantity.magnitude:g} {quantity.units}"
    except Exception:  # units pint cannot reduce (arbitrary units like [IU]); a factor past a float
        return None


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
