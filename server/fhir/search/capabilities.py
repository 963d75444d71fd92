"""What search contributes to the CapabilityStatement, generated from the registry.

Each resource type lists every search parameter the registry holds for it (the R4 ones
and the custom ones), the `_include` and `_revinclude` values that work, and the
modifiers per parameter type in the parameter's documentation. tests/fhir/search reads
these claims back and exercises each one.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from server.fhir.search import terminology
from server.fhir.search.parameters import MODIFIERS, REGISTRY, TERMINOLOGY_MODIFIERS, SearchParameter

FEATURES: dict[str, Any] = {
    "conditionalCreate": True,
    "conditionalUpdate": True,
    "conditionalDelete": "multiple",
}


# Parameters evaluated specially (not from search terms) and the modifiers they take.
SPECIAL_MODIFIERS = {"_id": ("missing", "not"), "_lastUpdated": ("missing",), "_text": (), "_content": ()}


def modifiers(parameter: SearchParameter) -> list[str]:
    """The modifiers that work on a parameter right now (`:Type` per reference target)."""
    if parameter.code in SPECIAL_MODIFIERS:
        return list(SPECIAL_MODIFIERS[parameter.code])
    found = list(MODIFIERS.get(parameter.type, ()))
    if parameter.type == "token" and not terminology.available():
        found = [m for m in found if m not in TERMINOLOGY_MODIFIERS]
    if parameter.type == "reference":
        found.extend(parameter.targets)
    return found


def search_params(type_: str) -> list[dict[str, Any]]:
    params = []
    for code, parameter in sorted(REGISTRY.for_type(type_).items()):
        entry: dict[str, Any] = {"name": code, "definition": parameter.url, "type": parameter.type}
        mods = modifiers(parameter)
        if mods:
            entry["documentation"] = "Modifiers: " + ", ".join(f":{m}" for m in mods)
        params.append(entry)
    return params


@cache
def _reverse_includes() -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for source, parameters in sorted(REGISTRY.standard.items()):
        for code, parameter in sorted(parameters.items()):
            if parameter.type == "reference":
                for target in parameter.targets:
                    table.setdefault(target, []).append(f"{source}:{code}")
    return table


def resource_search(type_: str) -> dict[str, Any]:
    includes = [
        f"{type_}:{code}" for code, p in sorted(REGISTRY.for_type(type_).items()) if p.type == "reference"
    ]
    return {
        "searchInclude": ["*", *includes],
        "searchRevInclude": ["*", *_reverse_includes().get(type_, [])],
        "searchParam": search_params(type_),
    }
