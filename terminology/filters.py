"""ValueSet.compose.include.filter: what each property/op/value selects.

Each filter becomes part of a `ConceptCriteria` (answered by an index in MongoDB) and,
where no index can answer exactly (regular expressions, displays, leaves), a test run on
the candidate concepts. Operators follow R4 (`=`, `is-a`, `descendent-of`, `is-not-a`,
`regex`, `in`, `not-in`, `generalizes`, `exists`) plus R5's `child-of` and
`descendent-leaf`, which R4 servers are asked to accept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from server.store.terminology import ConceptCriteria
from terminology.codesystems import CodeSystemVersion, Test
from terminology.concepts import Concept
from terminology.outcomes import tx_error

HIERARCHY_PROPERTIES = {"concept", "code"}


@dataclass
class Selection:
    criteria: ConceptCriteria = field(default_factory=ConceptCriteria)
    tests: list[Test] = field(default_factory=list)


def _regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise tx_error(400, "invalid", f"The regex '{value}' is not valid: {exc}", "vs-invalid") from None


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


async def compile_filters(cs: CodeSystemVersion, filters: list[dict[str, Any]]) -> Selection:
    selection = Selection()
    criteria = selection.criteria
    for f in filters:
        prop, op, value = f.get("property"), f.get("op"), f.get("value")
        if value is None or value == "":
            raise tx_error(
                400, "invalid",
                f"The system {cs.url} filter with property = {prop}, op = {op} has no value",
                "vs-invalid",
            )
        value = str(value)
        if prop in HIERARCHY_PROPERTIES and op in ("is-a", "descendent-of", "is-not-a", "child-of", "descendent-leaf", "generalizes"):
            if op == "is-a":
                criteria.self_or_descendant_of = value
            elif op == "descendent-of":
                criteria.descendant_of = value
            elif op == "is-not-a":
                criteria.not_self_or_descendant_of = value
            elif op == "child-of":
                criteria.child_of = value
            elif op == "descendent-leaf":
                criteria.descendant_of = value
                selection.tests.append(lambda c: c.leaf)
            else:  # generalizes: the concept and its ancestors
                concept = await cs.find(value)
                criteria.codes = [value, *(concept.ancestors if concept else [])]
        elif prop in HIERARCHY_PROPERTIES and op in ("=", "in", "not-in", "regex"):
            if op == "=":
                criteria.codes = [value]
            elif op == "in":
                criteria.codes = _split(value)
            elif op == "not-in":
                excluded = set(_split(value))
                selection.tests.append(lambda c, excluded=excluded: c.code not in excluded)
            else:
                pattern = _regex(value)
                selection.tests.append(lambda c, p=pattern: p.fullmatch(c.code) is not None)
        elif prop == "display" and op in ("=", "regex"):
            if op == "=":
                selection.tests.append(lambda c, v=value: c.display == v)
            else:
                pattern = _regex(value)
                selection.tests.append(lambda c, p=pattern: c.display is not None and p.fullmatch(c.display) is not None)
        elif prop == "inactive" and op in ("=",):
            wanted = value.lower() == "true"
            selection.tests.append(lambda c, w=wanted: c.inactive == w)
        elif prop == "parent" and op == "=":
            criteria.child_of = value
        elif prop == "child" and op == "=":
            concept = await cs.find(value)
            criteria.codes = list(concept.parents) if concept else []
        elif op == "=":
            criteria.property_in.append((prop, [value]))
        elif op == "in":
            criteria.property_in.append((prop, _split(value)))
        elif op == "not-in":
            criteria.property_not_in.append((prop, _split(value)))
        elif op == "exists":
            criteria.property_exists.append((prop, value.lower() == "true"))
        elif op == "regex":
            pattern = _regex(value)
            selection.tests.append(
                lambda c, p=pattern, prop=prop: any(p.fullmatch(t) for t in c.property_texts(prop))
            )
        else:
            raise tx_error(
                400, "not-supported",
                f"The filter property = {prop}, op = {op} is not supported for {cs.url}",
                "vs-invalid",
            )
    return selection

