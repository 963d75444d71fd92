"""Search parameters: the R4 definitions shipped as package data, plus custom ones.

R4 defines 1,375 SearchParameter resources (scripts/build_definitions.py reduces them to
`search-parameters.json.gz`, each expression already split per base type). A
`SearchParameter` here is one parameter *on one resource type*: its code, type, the
FHIRPath expression for that type, its targets and components. The parameters common to
every resource (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`,
`_text`, `_content`) are defined on `Resource`/`DomainResource` and apply to every type.

Custom SearchParameter resources stored on the server join the registry (see
`Registry.replace_custom`); the server refreshes them from the store periodically, so
every process converges within a bounded delay.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from server.fhir.definitions import load_json, resource_types
from server.fhir.search.fhirpath import expression_for_base, split_union

TYPES = ("number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special")
CODE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}|_[a-z][A-Za-z0-9_\-]{0,62}")

# Modifiers per parameter type (search.html#modifiers), as this server implements them.
# `in`, `not-in`, `above` and `below` on tokens need the terminology service and are
# claimed only once one is installed (server/fhir/search/terminology.py).
MODIFIERS: dict[str, tuple[str, ...]] = {
    "number": ("missing",),
    "date": ("missing",),
    "string": ("missing", "exact", "contains"),
    "token": ("missing", "not", "text", "of-type", "in", "not-in", "above", "below"),
    "reference": ("missing", "identifier", "type", "above", "below"),
    "composite": ("missing",),
    "quantity": ("missing",),
    "uri": ("missing", "above", "below"),
    "special": (),
}
TERMINOLOGY_MODIFIERS = frozenset({"in", "not-in", "above", "below"})
COMPARATORS = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


@dataclass(frozen=True)
class Component:
    definition: str  # the url of the component's own SearchParameter
    expression: str  # relative to the composite's expression
    type: str


@dataclass(frozen=True)
class SearchParameter:
    """One search parameter as it applies to one resource type."""

    url: str
    code: str
    type: str
    base: str  # the resource type it applies to here
    expression: str  # the FHIRPath expression for `base` only ("" for _text, _content)
    target: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    custom: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        """Reference targets (every type when the definition says `Any` or lists none)."""
        if self.type != "reference":
            return ()
        if not self.target or "Resource" in self.target or "Any" in self.target:
            return tuple(sorted(resource_types()))
        return self.target


@dataclass
class Registry:
    """Parameters per resource type: the R4 ones and the custom ones, by code."""

    standard: dict[str, dict[str, SearchParameter]]
    by_url: dict[str, list[SearchParameter]]
    custom: dict[str, dict[str, SearchParameter]] = field(default_factory=dict)
    generation: int = 0

    def for_type(self, type_: str) -> dict[str, SearchParameter]:
        """Code -> parameter for one type; custom parameters override standard codes."""
        own = self.custom.get(type_)
        if not own:
            return self.standard.get(type_, {})
        return {**self.standard.get(type_, {}), **own}

    def get(self, type_: str, code: str) -> SearchParameter | None:
        return self.for_type(type_).get(code)

    def replace_custom(self, parameters: Iterable[SearchParameter]) -> None:
        """Install the current custom parameters (from the store) in one step."""
        table: dict[str, dict[str, SearchParameter]] = {}
        for parameter in parameters:
            table.setdefault(parameter.base, {})[parameter.code] = parameter
        if table != self.custom:
            self.custom = table
            self.generation += 1


def _component_types(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["url"]: row["type"] for row in rows}


def _parameters_of(row: dict[str, Any], types_by_url: dict[str, str], bases: Iterable[str], custom: bool) -> list[SearchParameter]:
    components = tuple(
        Component(c["definition"], c["expression"], types_by_url.get(c["definition"], "token"))
        for c in row.get("component", [])
    )
    found = []
    for base in bases:
        expression = row["expression"].get(base, "") if isinstance(row["expression"], dict) else row["expression"]
        found.append(
            SearchParameter(
                row["url"], row["code"], row["type"], base, expression,
                tuple(row.get("target", [])), components, custom,
            )
        )
    return found


def _common_bases(base: str) -> list[str]:
    if base == "Resource":
        return sorted(resource_types())
    if base == "DomainResource":
        return sorted(t for t in resource_types() if t not in ("Bundle", "Binary", "Parameters"))
    return [base]


@cache
def standard_rows() -> list[dict[str, Any]]:
    raw = resources.files("server.fhir.definitions").joinpath("search-parameters.json.gz").read_bytes()
    rows = json.loads(gzip.decompress(raw))
    assert isinstance(rows, list)
    return rows


def _build_registry() -> Registry:
    rows = standard_rows()
    types_by_url = _component_types(rows)
    standard: dict[str, dict[str, SearchParameter]] = {}
    by_url: dict[str, list[SearchParameter]] = {}
    for row in rows:
        if row["code"] in ("_query", "_filter"):
            continue  # named queries and _filter are not implemented (not claimed)
        bases = [b for base in row["base"] for b in _common_bases(base)]
        if row["base"][0] in ("Resource", "DomainResource"):
            row = {**row, "expression": _common_expression(row)}
        for parameter in _parameters_of(row, types_by_url, bases, custom=False):
            standard.setdefault(parameter.base, {})[parameter.code] = parameter
            by_url.setdefault(parameter.url, []).append(parameter)
    return Registry(standard, by_url)


def _common_expression(row: dict[str, Any]) -> dict[str, str]:
    """`Resource.meta.tag` for every type: rewritten as `Patient.meta.tag`, ..."""
    expression = next(iter(row["expression"].values()), "")
    root = row["base"][0]
    return {
        t: expression.replace(f"{root}.", f"{t}.") if expression else ""
        for t in _common_bases(root)
    }


REGISTRY = _build_registry()


def from_resource(resource: dict[str, Any]) -> list[SearchParameter]:
    """The parameters a custom SearchParameter resource defines (one per base type).

    Raises ValueError with a readable reason when the resource cannot be used.
    """
    code = resource.get("code")
    if not isinstance(code, str) or not CODE.fullmatch(code):
        raise ValueError(f"SearchParameter.code {code!r} is not a valid parameter name")
    kind = resource.get("type")
    if kind not in TYPES or kind == "special":
        raise ValueError(f"SearchParameter.type {kind!r} is not supported")
    expression = resource.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("SearchParameter.expression is required")
    bases = resource.get("base") or []
    unknown = [b for b in bases if b not in resource_types() and b not in ("Resource", "DomainResource")]
    if not bases or unknown:
        raise ValueError(f"SearchParameter.base {bases!r} must name R4 resource types")
    expanded = [b for base in bases for b in _common_bases(base)]
    fragments = split_union(expression)
    row = {
        "url": resource.get("url") or f"urn:kuroshio:search-parameter:{code}",
        "code": code,
        "type": kind,
        "expression": {b: expression_for_base(fragments, b) for b in expanded},
        "target": resource.get("target", []),
        "component": [
            {"definition": c.get("definition", ""), "expression": c.get("expression", "")}
            for c in resource.get("component", []) if isinstance(c, dict)
        ],
    }
    if kind == "composite" and not row["component"]:
        raise ValueError("A composite SearchParameter needs components")
    types_by_url = {url: params[0].type for url, params in REGISTRY.by_url.items()}
    return [p for p in _parameters_of(row, types_by_url, expanded, custom=True) if p.expression]


def compartments() -> dict[str, dict[str, list[str]]]:
    """Compartment (Patient, Encounter, ...) -> member resource type -> linking parameters."""
    table = load_json("compartments.json")
    assert isinstance(table, dict)
    return table
