"""Search terms: what a stored resource is found by (search.html, per parameter type).

`index(resource)` is the write path's indexer (`interactions.HOOKS.index`). It returns
the `s` field of the stored document, laid out so that a handful of MongoDB indexes
serve every parameter of every type:

- `k`: strings, each prefixed by the parameter code, for exact and prefix matching:
    `code|system|value` and `code#value`  token (system|code, and code in any system)
    `code|system|`                        token with a system and no code (found by `system|`)
    `code~text`                           token :text (display / text, normalized)
    `code!tsys|tcode|value`               token :of-type (Identifier.type + value)
    `code:normalized` / `code=exact`      string (prefix, :contains) and string :exact
    `code>Type/id`, `code>url`            reference and uri (canonical URLs too)
    `code@system|value`, `code@#value`    reference :identifier
- `v`: `{p, lo, hi}` ranges for date (datetimes), number and quantity (floats; quantities
  add `s` system and `c` unit code, and a second entry with `s: "~"` in UCUM canonical
  units), matched with `$elemMatch` under the spec's range semantics.
- `c`: composite entries `{p, k0: [keys], l1, h1, s1, c1, ...}`, one per combination.
- `o`: `{code: value}` sort keys (`_sort`).
- `g`: `[longitude, latitude]` of a Location (`near`).

`:missing` needs no terms of its own: a parameter has a value exactly when one of its
keys (`code` followed by a separator), ranges or composite entries is there.
- `tx` / `cx`: narrative text and all text content, under a MongoDB text index
  (`_text`, `_content`).

Strings are normalized for the default string match: accents removed (NFKD without
combining marks) and case folded, so `Müller` is found by `muller`.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from server.fhir import jsonio, structure
from server.fhir.definitions import resource_types
from server.fhir.search import ucum
from server.fhir.search.fhirpath import Extractor, Path, compile_expression, compile_relative, reacher, walk
from server.fhir.search.parameters import REGISTRY, SearchParameter
from terminology.builtin import UCUM

log = logging.getLogger("kuroshio.search")
MAX_KEY = 512  # longest indexed string (longer values are indexed by their prefix)
MIN_DATE = datetime(1, 1, 1, tzinfo=UTC)
MAX_DATE = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
Entry = dict[str, Any]


# --- normalization --------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string (search.html#string)."""
    if text.isascii():
        return text.lower()[:MAX_KEY]
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()[:MAX_KEY]


# --- dates ----------------------------------------------------------------------------------

_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@lru_cache(maxsize=16384)
def date_range(text: str) -> tuple[datetime, datetime] | None:
    """The instants a FHIR date/dateTime/instant covers, to its precision, in UTC.

    `2013` covers the whole year, `2013-01-14T10:00Z` the minute; a time without a zone
    is taken as UTC. None if the text is not a FHIR date. Cached: the resources of a
    patient's bundle repeat the same instants (an encounter's observations share its
    time), and the answer is immutable.
    """
    match = _DATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        if month is None:
            low = datetime(int(year), 1, 1, tzinfo=UTC)
            high = datetime(int(year) + 1, 1, 1, tzinfo=UTC) if int(year) < 9999 else None
        elif day is None:
            low = datetime(int(year), int(month), 1, tzinfo=UTC)
            high = (
                datetime(int(year) + (int(month) == 12), int(month) % 12 + 1, 1, tzinfo=UTC)
                if int(year) < 9999 or int(month) < 12 else None
            )
        elif hour is None:
            low = datetime(int(year), int(month), int(day), tzinfo=UTC)
            high = low + timedelta(days=1) if low.date() < MAX_DATE.date() else None
        else:
            millis = int((fraction or "0")[:3].ljust(3, "0"))
            low = datetime(
                int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
                millis * 1000, tzinfo=UTC,
            )
            if zone and zone != "Z":
                sign = 1 if zone[0] == "+" else -1
                low -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            step = (
                timedelta(minutes=1) if second is None
                else timedelta(seconds=1) if fraction is None
                else timedelta(milliseconds=1)
            )
            high = low + step
    except (ValueError, OverflowError):
        return None
    return low, (high - timedelta(milliseconds=1)) if high is not None else MAX_DATE


def _date_entries(value: Any, kind: str) -> list[tuple[datetime, datetime]]:
    if kind in ("date", "dateTime", "instant", "string"):
        found = date_range(value) if isinstance(value, str) else None
        return [found] if found else []
    if type(value) is not dict:
        return []
    if kind == "Period":
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        if start is None and end is None:
            return []
        return [(start[0] if start else MIN_DATE, end[1] if end else MAX_DATE)]
    if kind == "Timing":
        ranges = [r for e in value.get("event", []) or [] if (r := date_range(e) if isinstance(e, str) else None)]
        bounds = (value.get("repeat") or {}).get("boundsPeriod")
        if isinstance(bounds, dict):
            ranges.extend(_date_entries(bounds, "Period"))
        if not ranges:
            return []
        return [(min(r[0] for r in ranges), max(r[1] for r in ranges))]
    return []


# --- numbers and quantities -----------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    return float(value)


_QUANTITY_TYPES = {"Quantity", "Age", "Duration", "Count", "Distance", "SimpleQuantity", "MoneyQuantity"}


def _quantity_entries(p: str, value: Any, kind: str) -> list[Entry]:
    """Range entries for a Quantity (or Range, Money): as sent, and in UCUM canonical form."""
    if type(value) is not dict:
        number = _number(value)
        return [{"p": p, "lo": number, "hi": number}] if number is not None else []
    if kind == "Range":
        low, high = value.get("low") or {}, value.get("high") or {}
        lo, hi = _number(low.get("value")), _number(high.get("value"))
        if lo is None and hi is None:
            return []
        unit_of = low if lo is not None else high
        return _unit_entries(
            p, lo if lo is not None else float("-inf"), hi if hi is not None else float("inf"),
            unit_of.get("system"), unit_of.get("code"), unit_of.get("unit"),
        )
    if kind == "Money":
        number = _number(value.get("value"))
        if number is None:
            return []
        return _unit_entries(p, number, number, "urn:iso:std:iso:4217", value.get("currency"), None)
    if kind in _QUANTITY_TYPES:
        number = _number(value.get("value"))
        if number is None:
            return []
        return _unit_entries(p, number, number, value.get("system"), value.get("code"), value.get("unit"))
    return []


def _unit_entries(p: str, lo: float, hi: float, system: Any, code: Any, unit: Any) -> list[Entry]:
    system = system if isinstance(system, str) else None
    entries: list[Entry] = [{"p": p, "lo": lo, "hi": hi, "s": system, "c": code if isinstance(code, str) else None}]
    if isinstance(unit, str) and unit != code:
        entries.append({"p": p, "lo": lo, "hi": hi, "s": system, "c": unit})
    if system == UCUM and isinstance(code, str):
        converted = ucum.canonical_range(lo, hi, code)
        if converted is not None:
            entries.append({"p": p, "lo": converted[0], "hi": converted[1], "s": "~", "c": converted[2]})
    return entries


# --- tokens, strings, references ------------------------------------------------------------

_PRIMITIVE_TOKEN = {"code", "string", "id", "uri", "url", "canonical", "oid", "uuid", "markdown"}


def _token_parts(value: Any, kind: str) -> list[tuple[str | None, str | None, str | None]]:
    """(system, code, text) triples a token value is found by."""
    if kind == "boolean" or isinstance(value, bool):
        return [(None, "true" if value else "false", None)] if isinstance(value, bool) else []
    if isinstance(value, str):
        return [(None, value, None)]
    if type(value) is not dict:
        return []
    if kind == "CodeableConcept":
        parts = [
            (c.get("system"), c.get("code"), c.get("display"))
            for c in value.get("coding", []) or [] if type(c) is dict
        ]
        if isinstance(value.get("text"), str):
            parts.append((None, None, value["text"]))
        return parts
    if kind == "Coding":
        return [(value.get("system"), value.get("code"), value.get("display"))]
    if kind == "Identifier":
        text = (value.get("type") or {}).get("text") if isinstance(value.get("type"), dict) else None
        return [(value.get("system"), value.get("value"), text)]
    if kind == "ContactPoint":
        return [(value.get("system"), value.get("value"), None)]
    if kind in _QUANTITY_TYPES:
        return [(value.get("system"), value.get("code"), value.get("unit"))]
    return []


def token_keys(value: Any, kind: str) -> list[str]:
    """Token keys without the parameter code (`|system|code`, `#code`, `~text`).

    A value with a system and no code (an Identifier without `value`, a Coding without
    `code`) gets `|system|` alone: `system|` is "any value in this system" (search.html,
    token), and its anchored prefix `code|system|` finds it with the coded ones.
    """
    keys = []
    for system, code, text in _token_parts(value, kind):
        if isinstance(code, str) and code:
            code = code[:MAX_KEY]
            keys.append(f"|{system if isinstance(system, str) else ''}|{code}")
            keys.append(f"#{code}")
        elif isinstance(system, str) and system:
            keys.append(f"|{system}|")
        if isinstance(text, str) and text:
            keys.append(f"~{normalize(text)}")
    if kind == "Identifier" and type(value) is dict and isinstance(value.get("value"), str):
        identifier_type = value.get("type")
        if type(identifier_type) is dict:
            for coding in identifier_type.get("coding", []) or []:
                if type(coding) is dict:
                    keys.append(f"!{coding.get('system') or ''}|{coding.get('code') or ''}|{value['value'][:MAX_KEY]}")
    return keys


_STRING_PARTS = {
    "HumanName": ("text", "family", "given", "prefix", "suffix"),
    "Address": ("text", "line", "city", "district", "state", "postalCode", "country"),
}


def string_values(value: Any, kind: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    parts = _STRING_PARTS.get(kind)
    if parts is None or type(value) is not dict:
        if kind in ("CodeableConcept", "Coding") and type(value) is dict:
            return [t for t in (value.get("text"), value.get("display")) if isinstance(t, str)]
        return []
    found = []
    for part in parts:
        item = value.get(part)
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            found.extend(i for i in item if isinstance(i, str))
    return found


def string_keys(value: Any, kind: str) -> list[str]:
    keys = []
    for text in string_values(value, kind):
        keys.append(f":{normalize(text)}")
        keys.append(f"={text[:MAX_KEY]}")
    return keys


def reference_literal(literal: str) -> list[str]:
    """The forms a literal reference is found by: `Type/id` (also for absolute URLs that
    end in Type/id, with or without a version) and the URL as written."""
    forms = [literal[:MAX_KEY]]
    parts = literal.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        forms.append("/".join(parts[:-2]))
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] in resource_types():
        relative = f"{parts[-2]}/{parts[-1]}"
        if relative not in forms:
            forms.append(relative)
    if "|" in literal:  # a canonical with a version
        forms.append(literal.split("|", 1)[0])
    return forms


def reference_keys(value: Any, kind: str) -> list[str]:
    """Reference keys without the parameter code (`>target`, `@system|value`)."""
    if isinstance(value, str):  # canonical, uri
        return [f">{form}" for form in reference_literal(value)]
    if type(value) is not dict:
        return []
    if kind == "Resource" or "resourceType" in value:
        if isinstance(value.get("id"), str) and isinstance(value.get("resourceType"), str):
            return [f">{value['resourceType']}/{value['id']}"]
        return []
    keys = []
    literal = value.get("reference")
    if isinstance(literal, str) and literal and not literal.startswith("#"):
        keys.extend(f">{form}" for form in reference_literal(literal))
    identifier = value.get("identifier")
    if type(identifier) is dict and isinstance(identifier.get("value"), str):
        system = identifier.get("system") if isinstance(identifier.get("system"), str) else ""
        keys.append(f"@{system}|{identifier['value'][:MAX_KEY]}")
        keys.append(f"@#{identifier['value'][:MAX_KEY]}")
    return keys


def uri_keys(value: Any, kind: str) -> list[str]:
    return [f">{value[:MAX_KEY]}"] if isinstance(value, str) else []


KEY_MAKERS: dict[str, Callable[[Any, str], list[str]]] = {
    "token": token_keys,
    "string": string_keys,
    "reference": reference_keys,
    "uri": uri_keys,
}


def range_entries(p: str, value: Any, kind: str, parameter_type: str) -> list[Entry]:
    if parameter_type == "date":
        return [{"p": p, "lo": lo, "hi": hi} for lo, hi in _date_entries(value, kind)]
    if parameter_type == "number":
        number = _number(value)
        return [{"p": p, "lo": number, "hi": number}] if number is not None else []
    return _quantity_entries(p, value, kind)


# --- per type plans -------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One parameter's compiled extraction on one resource type."""

    parameter: SearchParameter
    extractor: Extractor
    # composites: per path of the composite expression, (component type, extractor
    # relative to the path's element) for each component
    components: tuple[tuple[Path, tuple[tuple[str, Extractor], ...]], ...] = ()
    # compiled paths as functions of the resource, with the FHIR type they reach
    reaches: tuple[tuple[Callable[[dict[str, Any]], list[Any]], str], ...] = ()
    # composites whose expression includes the resource itself: per component, the
    # parameter of the type whose terms are exactly the component's values on the
    # resource (a resource is one node, so the pairs are all combinations: the
    # composite matches when each component's parameter does, and no entries are stored)
    root_components: tuple[str, ...] = ()

    def first_keys(self) -> frozenset[str] | None:
        """The top-level JSON keys the parameter reads (None: it may read anything, or it
        has a value, `false`, when they are absent)."""
        if self.extractor.fallback is not None or self.extractor.present_not_false:
            return None
        keys = set()
        for path in self.extractor.paths:
            if not path.steps or path.steps[0][0] != "get":
                return None
            keys.add(path.steps[0][1])
        return frozenset(keys)


_SKIPPED = {"_id", "_lastUpdated", "_text", "_content"}  # stored in _id, ts, tx, cx


def _produces(parameter_type: str, fhir_type: str) -> bool:
    """Whether values of `fhir_type` give terms for a parameter of `parameter_type`."""
    if parameter_type == "quantity":
        return fhir_type in _QUANTITY_TYPES or fhir_type in ("Range", "Money", "integer", "decimal")
    if parameter_type == "date":
        return fhir_type in ("date", "dateTime", "instant", "Period", "Timing", "string")
    return True


def _same_terms(component: Extractor, kind: str, candidate: SearchParameter) -> bool:
    """The candidate's paths give exactly the component's terms on the resource."""
    if candidate.type != kind:
        return False
    try:
        other = compile_expression(candidate.expression, candidate.base)
    except ValueError:
        return False
    if other.fallback is not None:
        return False
    own = {(p.steps, p.type) for p in component.paths}
    theirs = {(p.steps, p.type) for p in other.paths}
    return own <= theirs and all(not _produces(kind, t) for steps, t in theirs - own)


def _root_components(parameter: SearchParameter, components: tuple[tuple[str, Extractor], ...]) -> tuple[str, ...]:
    found = []
    candidates = REGISTRY.for_type(parameter.base).values()
    for kind, extractor in components:
        match = next((c.code for c in candidates if c.type != "composite" and _same_terms(extractor, kind, c)), None)
        if match is None:
            return ()
        found.append(match)
    return tuple(found)


def plan(parameter: SearchParameter) -> Plan:
    """Compile one parameter (ValueError if it cannot be evaluated at all)."""
    extractor = compile_expression(parameter.expression, parameter.base)
    reaches = tuple((reacher(path.steps), path.type) for path in extractor.paths)
    if parameter.type != "composite":
        return Plan(parameter, extractor, (), reaches)
    if extractor.fallback is not None:
        raise ValueError(f"composite {parameter.code} on {parameter.base}: unsupported expression")
    components = []
    root: tuple[str, ...] = ()
    for path in extractor.paths:
        compiled = tuple(
            (c.type, compile_relative(c.expression, parameter.base, path.element)) for c in parameter.components
        )
        if not path.steps and (found := _root_components(parameter, compiled)):
            root = found
        else:
            components.append((path, compiled))
    return Plan(parameter, extractor, tuple(components), reaches, root)


@dataclass(frozen=True)
class TypePlans:
    """A type's plans, and which of them can apply given the resource's top-level keys."""

    plans: tuple[Plan, ...]
    by_key: dict[str, tuple[int, ...]]
    always: tuple[int, ...]

    def applicable(self, resource: dict[str, Any]) -> list[Plan]:
        chosen = set(self.always)
        for key in resource:
            found = self.by_key.get(key)
            if found:
                chosen.update(found)
        return [self.plans[i] for i in sorted(chosen)]


_PLANS: dict[tuple[str, int], TypePlans] = {}


def type_plans(type_: str) -> TypePlans:
    """The compiled plans of a type for the registry's current generation."""
    key = (type_, REGISTRY.generation)
    found = _PLANS.get(key)
    if found is None:
        for stale in [k for k in _PLANS if k[1] != REGISTRY.generation]:
            del _PLANS[stale]
        compiled: list[Plan] = []
        for parameter in REGISTRY.for_type(type_).values():
            if parameter.code in _SKIPPED or not parameter.expression:
                continue
            try:
                compiled.append(plan(parameter))
            except ValueError:
                if not parameter.custom:
                    raise
        by_key: dict[str, list[int]] = {}
        always = []
        for position, item in enumerate(compiled):
            first = item.first_keys()
            if first is None:
                always.append(position)
            else:
                for name in first:
                    by_key.setdefault(name, []).append(position)
        found = TypePlans(tuple(compiled), {k: tuple(v) for k, v in by_key.items()}, tuple(always))
        _PLANS[key] = found
    return found


def plans(type_: str) -> tuple[Plan, ...]:
    return type_plans(type_).plans


def plan_of(parameter: SearchParameter) -> Plan:
    """The cached plan of a parameter (compiled now if it is not the registry's)."""
    for item in type_plans(parameter.base).plans:
        if item.parameter is parameter:
            return item
    return plan(parameter)


# --- the indexer ----------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")


def narrative_text(resource: dict[str, Any]) -> str:
    text = resource.get("text")
    div = text.get("div") if isinstance(text, dict) else None
    return _TAG.sub(" ", div) if isinstance(div, str) else ""


# a string value (after `:`, `[` or `,`, and not followed by `:` as a key is), not a URL,
# URN or narrative markup; possessive, so long base64 data is scanned once. The leading
# character is matched, not looked behind for: the same matches (a match ends at a quote,
# so it never holds the next one's leading character), found 40% faster.
_STRING_VALUES = re.compile(rb'[:\[,]"(?!https?:|urn:|<div)((?:[^"\\]++|\\.)++)"(?!:)')
_LONGEST_TEXT = 2000  # longer strings are base64 data, not text
# One "word" with a digit in it is an id, a date, a number or a code: not text to search,
# and the bulk of the text index's entries if it were indexed.
_DIGIT = re.compile(rb"\d")


def content_text(resource: dict[str, Any]) -> str:
    """The text of every string value of the resource (not keys, URLs, narrative markup,
    long base64 data, nor single words with digits: ids, dates, codes), for the `_content`
    text index. Serialized by orjson and scanned
    with one regular expression: walking the tree in Python costs several times more."""
    data = orjson.dumps(resource, default=str)
    return b" ".join(
        v for v in _STRING_VALUES.findall(data)
        if len(v) <= _LONGEST_TEXT and (b" " in v or not _DIGIT.search(v))
    ).decode("utf-8", "replace")


# A date parameter whose values on a resource all lie within this span is "narrow": its
# sort key (the earliest start) is then at most this far before any of its values, so a
# lower bound on the values bounds the sort key too. The few resources with wider values
# (Periods, partial dates by month or year) are listed in `w` and searched apart
# (server/fhir/search/service.py, `date_bounded`).
NARROW_DATE_SPAN = timedelta(days=1)


def _is_wide(ranges: list[Entry]) -> bool:
    return max(r["hi"] for r in ranges) - min(r["lo"] for r in ranges) > NARROW_DATE_SPAN


def _sort_key(keys: list[str], ranges: list[Entry], parameter_type: str) -> Any:
    own = [r["lo"] for r in ranges if r.get("s") != "~"]  # as sent, not the canonical form
    if own:
        return min(own)
    for key in keys:
        if parameter_type == "string" and key.startswith(":"):
            return key[1:]
        if parameter_type == "token" and key.startswith("#"):
            return key[1:]
        if parameter_type in ("reference", "uri") and key.startswith(">"):
            return key[1:]
    return None


_FAILED_CUSTOM: set[str] = set()  # URLs of custom parameters whose evaluation failed here


def index(resource: dict[str, Any]) -> dict[str, Any]:
    """The search terms of one stamped resource (the `s` field of its document)."""
    type_ = resource["resourceType"]
    keys: list[str] = []
    ranges: list[Entry] = []
    composites: list[Entry] = []
    order: dict[str, Any] = {}
    wide: list[str] = []
    terms_extra: dict[str, Any] = {}
    plain_cache: list[dict[str, Any]] = []

    def plain() -> dict[str, Any]:
        if not plain_cache:
            plain_cache.append(jsonio.plain(resource))
        return plain_cache[0]

    memo: dict[tuple[int, int, int], list[Entry]] = {}
    for item in type_plans(type_).applicable(resource):
        parameter = item.parameter
        p = parameter.code
        kind = parameter.type
        if item.extractor.present_not_false:
            values = item.extractor.values(resource, plain)
        elif item.extractor.fallback is not None:
            try:
                values = item.extractor.values(resource, plain)
            except Exception:  # fhirpathpy failing on a custom expression: no terms, not a failed write
                if not parameter.custom:
                    raise
                if parameter.url not in _FAILED_CUSTOM:  # once per process, not once per write
                    _FAILED_CUSTOM.add(parameter.url)
                    log.warning("custom search parameter %s failed on %s (said once)", parameter.url, type_, exc_info=True)
                continue
        elif kind == "composite":
            values = [(None, "")] if item.components else []
        else:
            values = [(v, t) for reach, t in item.reaches for v in reach(resource)]
        if not values:
            continue
        if kind == "special":  # Location near: the position as a [longitude, latitude] point
            point = _point(values)
            if point is not None:
                terms_extra["g"] = point
            continue
        if kind == "composite":
            if item.components:
                composites.extend(_composite_entries(resource, item, memo))
            continue
        own_keys: list[str] = []
        own_ranges: list[Entry] = []
        maker = KEY_MAKERS.get(kind)
        for value, value_type in values:
            if maker is not None:
                own_keys.extend(maker(value, value_type))
            else:
                own_ranges.extend(range_entries(p, value, value_type, kind))
        if not own_keys and not own_ranges:
            continue
        if own_keys:
            keys.extend(dict.fromkeys(p + k for k in own_keys))
        ranges.extend(own_ranges)
        if kind == "date" and own_ranges and _is_wide(own_ranges):
            wide.append(p)
        sort_key = _sort_key(own_keys, own_ranges, kind)
        if sort_key is not None:
            order[p] = sort_key
    content = content_text(resource)
    terms: dict[str, Any] = {"k": keys, **terms_extra}
    if ranges:
        terms["v"] = ranges
    if composites:
        terms["c"] = composites
    if order:
        terms["o"] = order
    if wide:
        terms["w"] = wide
    narrative = narrative_text(resource)
    if narrative.strip():
        terms["tx"] = narrative
    if content:
        terms["cx"] = content
    return terms


def _point(values: list[tuple[Any, str]]) -> list[float] | None:
    for value, _ in values:
        if type(value) is dict:
            longitude, latitude = _number(value.get("longitude")), _number(value.get("latitude"))
            if longitude is not None and latitude is not None and -180 <= longitude <= 180 and -90 <= latitude <= 90:
                return [longitude, latitude]
    return None


def _composite_entries(resource: dict[str, Any], item: Plan, memo: dict[tuple[int, int, int], list[Entry]]) -> list[Entry]:
    """One entry per combination of component values, per composite node.

    Component values are memoized per (node, extractor) for the resource: Observation's
    eight composites read `code` of the same nodes over and over.
    """
    entries: list[Entry] = []
    p = item.parameter.code
    for path, components in item.components:
        for node in walk(resource, resource, path.steps):
            per_component = []
            for position, (component_type, extractor) in enumerate(components):
                key = (id(node), id(extractor), position)
                options = memo.get(key)
                if options is None:
                    options = component_options(resource, node, extractor, component_type, position)
                    memo[key] = options
                if not options:
                    break
                per_component.append(options)
            else:
                combos: list[Entry] = [{"p": p}]
                for options in per_component:
                    combos = [{**combo, **option} for combo in combos for option in options][:64]
                entries.extend(combos)
    return entries


def component_options(
    resource: dict[str, Any], node: Any, extractor: Extractor, component_type: str, position: int
) -> list[Entry]:
    """The possible values of one component at one composite node, as entry fields."""
    options: list[Entry] = []
    keys: list[str] = []
    for path in extractor.paths:
        for value in walk(resource, node, path.steps):
            maker = KEY_MAKERS.get(component_type)
            if maker is not None:
                keys.extend(maker(value, path.type))
            else:
                for entry in range_entries("", value, path.type, component_type):
                    options.append({
                        f"l{position}": entry["lo"], f"h{position}": entry["hi"],
                        f"s{position}": entry.get("s"), f"c{position}": entry.get("c"),
                    })
    if keys:
        options.append({f"k{position}": [k for k in dict.fromkeys(keys) if k[0] != "~"]})
    return options


def check_all() -> int:
    """Compile every parameter of every type (the test suite calls this); returns the count."""
    count = 0
    for type_ in sorted(resource_types()):
        count += len(plans(type_))
        assert structure.root(type_) is not None
    return count
