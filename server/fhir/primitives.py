"""The FHIR R4 primitive datatypes as they appear in JSON (datatypes.html#primitive,
json.html#primitive).

Each primitive has a JSON form (boolean: true/false; integer, unsignedInt, positiveInt,
decimal: a number; every other primitive: a string) and a lexical grammar, the regex that
the R4 StructureDefinition of the type carries (read from the definition table, not
retyped here). A checker returns None for a valid value or a sentence saying what is
wrong. The grammar regexes are applied with ASCII semantics (`\\s` is space, tab, CR, LF,
FF, VT), as the specification's Java-based tooling does: Python's Unicode `\\s` would
reject a no-break space inside a string.

Beyond the regexes, the specification also says: strings are never empty in JSON and at
most 1 MiB (1024*1024 characters) long; integers are 32-bit; dates SHALL be valid dates
(the regex alone accepts 2021-02-30); the xhtml of a narrative is a `div` in the XHTML
namespace using only the elements and attributes that constraint txt-1 lists, with some
content (txt-2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from functools import cache
from typing import Any
from xml.etree import ElementTree

from server.fhir.structure import table

Checker = Callable[[Any], str | None]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
STRING_MAX = 1024 * 1024
KNOWN_VALUES, KNOWN_VALUE_LENGTH = 4096, 256
XHTML = "{http://www.w3.org/1999/xhtml}"
_INTEGER_RANGES = {
    "integer": (INT32_MIN, INT32_MAX),
    "unsignedInt": (0, INT32_MAX),
    "positiveInt": (1, INT32_MAX),
}
_BASE64_COMPACT = re.compile(r"[0-9a-zA-Z+/=]+", re.ASCII)


def regex(type_name: str) -> re.Pattern[str]:
    """The R4 grammar of a string-based primitive."""
    return re.compile(table()[type_name]["regex"], re.ASCII)


def _boolean(value: Any) -> str | None:
    return None if type(value) is bool else "must be a JSON boolean (true or false)"


def _integer(type_name: str) -> Checker:
    low, high = _INTEGER_RANGES[type_name]

    def check(value: Any) -> str | None:
        if type(value) is not int:
            return f"must be a JSON number without fraction or exponent (a FHIR {type_name})"
        if not low <= value <= high:
            return f"{value} is outside the range of a FHIR {type_name} ({low}..{high})"
        return None

    return check


def _decimal(value: Any) -> str | None:
    # jsonio reads a decimal as a float when the float prints back to the same lexeme, and
    # as a Decimal otherwise; JSON has no NaN or Infinity, so a float here is finite.
    if type(value) in (int, float) or (isinstance(value, Decimal) and value.is_finite()):
        return None
    return "must be a JSON number (a FHIR decimal)"


def _string(type_name: str) -> Checker:
    grammar = regex(type_name)
    limit = STRING_MAX if type_name in ("string", "markdown") else None
    # Values recently found valid (code systems, units, codes repeat across resources):
    # a dict lookup instead of the regex. Bounded; a pure function's results never go stale.
    known: dict[str, None] = {}

    def check(value: Any) -> str | None:
        if type(value) is str and value in known:
            return None
        problem = _check(value)
        if problem is None and len(value) <= KNOWN_VALUE_LENGTH:
            if len(known) >= KNOWN_VALUES:
                known.clear()
            known[value] = None
        return problem

    def _check(value: Any) -> str | None:
        if type(value) is not str:
            return f"must be a JSON string (a FHIR {type_name})"
        if not value:
            return "must not be an empty string"
        if limit is not None and len(value) > limit:
            return f"is longer than the {limit} characters a FHIR {type_name} may have"
        if grammar.fullmatch(value) is None:
            return f"{_shown(value)} is not a valid FHIR {type_name}"
        return None

    return check


def _calendar(type_name: str) -> Checker:
    """date, dateTime and instant: the R4 regex, then a real calendar day."""
    lexical = _string(type_name)

    def check(value: Any) -> str | None:
        problem = lexical(value)
        if problem is None and len(value) >= 10:
            try:
                date.fromisoformat(value[:10])  # the regex matched: YYYY-MM-DD
            except ValueError:
                return f"{value!r} is not a valid FHIR {type_name}: there is no such day"
        return problem

    return check


def _base64(value: Any) -> str | None:
    if type(value) is not str:
        return "must be a JSON string (a FHIR base64Binary)"
    if not value:
        return "must not be an empty string"
    # The common unbroken form, checked in linear time; the R4 regex for the rest.
    if len(value) % 4 == 0 and _BASE64_COMPACT.fullmatch(value):
        return None
    if _base64_grammar().fullmatch(value) is None:
        return f"{_shown(value)} is not valid FHIR base64Binary"
    return None


@cache
def _base64_grammar() -> re.Pattern[str]:
    return regex("base64Binary")


@cache
def _narrative_allowlists() -> tuple[frozenset[str], frozenset[str]]:
    """The elements (namespaced) and attributes txt-1 allows, from R4's Narrative definition."""
    allowed = table()["xhtml"]["narrative"]
    return frozenset(XHTML + name for name in allowed["elements"]), frozenset(allowed["attributes"])


def _xhtml(value: Any) -> str | None:
    """A narrative div: well-formed XML, a `div` in the XHTML namespace, only the elements
    and attributes of txt-1, and some text or an image with a source (txt-2)."""
    if type(value) is not str:
        return "must be a JSON string (FHIR xhtml)"
    try:
        root = ElementTree.fromstring(value)
    except ElementTree.ParseError as exc:
        return f"is not well-formed XHTML: {exc}"
    if root.tag != XHTML + "div":
        return 'must be a <div xmlns="http://www.w3.org/1999/xhtml"> element'
    elements, attributes = _narrative_allowlists()
    has_image = False
    for element in root.iter():
        if element.tag not in elements:
            return f"must not contain the element {element.tag.replace(XHTML, '')} (txt-1)"
        for attribute in element.attrib:
            if attribute not in attributes:
                return f"must not contain the attribute {attribute} (txt-1)"
        has_image = has_image or (element.tag == XHTML + "img" and "src" in element.attrib)
    if not has_image and not "".join(root.itertext()).strip():
        return "must have some non-whitespace content (txt-2)"
    return None


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


@cache
def checker(type_name: str) -> Checker:
    """The checker of an R4 primitive type (`date`, `positiveInt`, ...)."""
    if type_name == "boolean":
        return _boolean
    if type_name in _INTEGER_RANGES:
        return _integer(type_name)
    if type_name == "decimal":
        return _decimal
    if type_name in ("date", "dateTime", "instant"):
        return _calendar(type_name)
    if type_name == "base64Binary":
        return _base64
    if type_name == "xhtml":
        return _xhtml
    return _string(type_name)


def is_primitive(type_name: str) -> bool:
    definition = table().get(type_name)
    return definition is not None and definition["kind"] == "primitive-type"
