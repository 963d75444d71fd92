"""The element structure of FHIR R4 resources and datatypes.

Built from the R4 StructureDefinitions (scripts/build_definitions.py writes the table):
for any element reached by navigating names from a resource type (`Patient`, `contact`,
`name`, `given`), it tells the cardinality, the possible types and whether the element is
in the summary. Choice elements are resolved by their typed name (`valueQuantity`), and
`contentReference` elements (Questionnaire.item.item) by the element they point to.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@cache
def table() -> dict[str, Any]:
    raw = resources.files("server.fhir.definitions").joinpath("structure.json.gz").read_bytes()
    return json.loads(gzip.decompress(raw))


@dataclass(frozen=True, slots=True)
class Element:
    """One element definition, as reached from a resource or datatype."""

    path: str  # the defining path: "Patient.contact.name", "HumanName.given", "Observation.value[x]"
    min: int
    max: str
    types: tuple[str, ...]
    summary: bool

    @property
    def repeating(self) -> bool:
        return self.max != "1"

    @property
    def defines_children(self) -> bool:
        """Backbone elements have their children defined inline, under their own path."""
        return not self.types or self.types[0] in ("BackboneElement", "Element")


def _definition(type_name: str) -> dict[str, Any] | None:
    return table().get(type_name)


def _lookup(path: str) -> list[Any] | None:
    definition = _definition(path.split(".", 1)[0])
    return definition["elements"].get(path) if definition else None


def _element(path: str, row: list[Any], chosen_type: str | None = None) -> Element:
    minimum, maximum, types, summary, reference = row
    if reference:
        target = _lookup(reference)
        assert target is not None, reference
        return Element(reference, minimum, maximum, tuple(target[2]), summary)
    return Element(path, minimum, maximum, (chosen_type,) if chosen_type else tuple(types), summary)


def root(type_name: str) -> Element | None:
    """The element that is a whole resource or datatype."""
    definition = _definition(type_name)
    if definition is None:
        return None
    return Element(type_name, 0, "*", (type_name,), True)


def child(parent: Element, name: str) -> Element | None:
    """The element `name` inside `parent`, or None if R4 defines no such element."""
    if parent.defines_children or parent.path == parent.types[0]:
        base = parent.path
    elif len(parent.types) == 1:
        base = parent.types[0]
    else:
        return None
    path = f"{base}.{name}"
    row = _lookup(path)
    if row is not None and not path.endswith("[x]"):
        return _element(path, row)
    # A choice element: `valueQuantity` is `value[x]` with type Quantity.
    for index in range(len(name) - 1, 0, -1):
        if name[index].isupper():
            stem, suffix = name[:index], name[index:]
            choice = _lookup(f"{base}.{stem}[x]")
            if choice is not None:
                for type_name in choice[2]:
                    if type_name[0].upper() + type_name[1:] == suffix:
                        return _element(f"{base}.{stem}[x]", choice, type_name)
                return None
    return None


def navigate(type_name: str, names: list[str]) -> Element | None:
    """Follow element names from a resource or datatype; None if any step is unknown."""
    element = root(type_name)
    for name in names:
        if element is None:
            return None
        element = child(element, name)
    return element


def choice_names(parent: Element, stem: str) -> list[str]:
    """The typed names a choice element can take in JSON (`value` -> `valueString`, ...)."""
    base = parent.path if parent.defines_children or parent.path == parent.types[0] else parent.types[0]
    row = _lookup(f"{base}.{stem}[x]")
    if row is None:
        return []
    return [stem + t[0].upper() + t[1:] for t in row[2]]
