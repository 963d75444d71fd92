"""Search requests parsed into a typed query (search.html).

A query string (or form body) becomes a `SearchQuery`: criteria, each naming a known
parameter with its modifier, chain and OR-values, plus the result controls (`_sort`,
`_count`, `_include`, ...). Every name is checked against the registry of the resource
type; unknown or malformed parameters are errors (400) in strict handling and are
dropped (and reported) in lenient handling. Nothing here builds a database filter:
values stay strings until the compiler turns them into typed terms.

Bounds keep pathological input cheap: at most `MAX_VALUES` OR-values per parameter and
`MAX_CRITERIA` parameters, chains at most `MAX_CHAIN` links deep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.fhir.definitions import resource_types
from server.fhir.outcome import error
from server.fhir.search.parameters import MODIFIERS, REGISTRY, SearchParameter

MAX_VALUES = 100
MAX_CRITERIA = 64
MAX_CHAIN = 4
MAX_INCLUDES = 16
MAX_VALUE_LENGTH = 2048

# Result parameters and the transport ones this server accepts on any search.
RESULT_PARAMETERS = {
    "_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total",
    "_contained", "_containedType", "_cursor", "_format", "_pretty", "__explain", "_type",
}
SPECIAL = {"_id", "_lastUpdated", "_text", "_content", "_list", "_has"}
SUMMARY = {"true", "text", "data", "count", "false"}
TOTAL = {"none", "estimate", "accurate"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _iterated_include(name: str) -> str | None:
    """`_include` or `_revinclude` for `_include:iterate` (or `:recurse`) and the like."""
    head, _, modifier = name.partition(":")
    return head if head in ("_include", "_revinclude") and modifier in ("iterate", "recurse") else None


def is_result_parameter(name: str) -> bool:
    """Whether `name` shapes the result (search.html 3.1.1.5) rather than selecting
    resources: conditional interactions must not count it as a criterion."""
    return name in RESULT_PARAMETERS or _iterated_include(name) is not None


@dataclass(frozen=True)
class Link:
    """One step of a chain: a reference parameter (by code, on each source type) and the
    types it is followed into (several when the chain does not name one)."""

    code: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Has:
    """`_has:Type:param:...`: resources referenced by `type` resources through `parameter`."""

    type: str
    parameter: SearchParameter
    referenced: str  # the type the parameter points to (the outer type)


@dataclass
class Criterion:
    """One parameter occurrence: OR between `values`; criteria are ANDed."""

    name: str  # as written, for messages
    types: tuple[str, ...]  # the resource types the final parameter applies to
    parameter: SearchParameter | None  # None for _id, _lastUpdated, _text, _content, _list
    special: str | None
    modifier: str | None
    values: list[str]
    chain: tuple[Link, ...] = ()
    has: tuple[Has, ...] = ()


@dataclass(frozen=True)
class Include:
    source: str  # the type whose parameter is followed ("*" for every type)
    parameter: str  # "*" for every reference parameter
    target: str | None
    iterate: bool
    reverse: bool


@dataclass
class SearchQuery:
    types: tuple[str, ...]  # one type, or several for a system search
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, int]] = field(default_factory=list)
    count: int | None = None
    includes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: tuple[str, ...] = ()
    total: str | None = None
    cursor: str | None = None
    explain: bool = False
    ignored: list[str] = field(default_factory=list)  # unknown names dropped (lenient)
    used: list[tuple[str, str]] = field(default_factory=list)  # the parameters applied

    @property
    def type(self) -> str | None:
        return self.types[0] if len(self.types) == 1 else None


def split_values(raw: str) -> list[str]:
    """OR-values: split on unescaped commas (search.html#escaping); escapes kept."""
    return split_unescaped(raw, ",")


def unescape(value: str) -> str:
    out, escaped = "", False
    for char in value:
        if escaped:
            out += char
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out += char
    return out


_PARTS = {sep: re.compile(rf"((?:\\.|[^\\{re.escape(sep)}])*)(\\?)({re.escape(sep)}|$)") for sep in ",|$"}


def split_unescaped(value: str, separator: str) -> list[str]:
    """Split on a separator (`,`, `|`, `$`) that is not escaped; parts still escaped."""
    parts = []
    for match in _PARTS[separator].finditer(value):
        parts.append(match.group(1) + match.group(2))
        if not match.group(3):
            break
    return parts


class Parser:
    def __init__(self, types: tuple[str, ...], lenient: bool, max_count: int) -> None:
        self.query = SearchQuery(types)
        self.lenient = lenient
        self.max_count = max_count

    def unknown(self, name: str, message: str) -> None:
        if self.lenient:
            self.query.ignored.append(name)
            return
        raise error(400, "not-supported", message, name)

    def parse(self, items: list[tuple[str, str]]) -> SearchQuery:
        if len(items) > MAX_CRITERIA + 32:
            raise error(400, "too-costly", f"Too many search parameters ({len(items)}); the limit is {MAX_CRITERIA}")
        for name, value in items:
            if len(value) > MAX_VALUE_LENGTH * 8:
                raise error(400, "too-costly", f"The value of {name} is too long")
            if (included := _iterated_include(name)) is not None:
                self.include(included, value, iterate=True)
            elif name in RESULT_PARAMETERS:
                self.result_parameter(name, value)
            else:
                self.criterion(name, value)
        if len(self.query.criteria) > MAX_CRITERIA:
            raise error(400, "too-costly", f"Too many search criteria; the limit is {MAX_CRITERIA}")
        return self.query

    # --- result parameters ------------------------------------------------------------------

    def result_parameter(self, name: str, value: str) -> None:
        query = self.query
        if name == "_count":
            if not value.isdigit():
                raise error(400, "value", f"_count={value!r} is not a non-negative integer", name)
            count = int(value)
            if count > self.max_count:
                raise error(400, "too-costly", f"_count={count} exceeds the maximum page size {self.max_count}", name)
            query.count = count
        elif name == "_sort":
            for key in value.split(","):
                self.sort_key(key.strip())
        elif name in ("_include", "_revinclude"):
            self.include(name, value)
        elif name == "_summary":
            if value not in SUMMARY:
                raise error(400, "value", f"_summary must be one of {', '.join(sorted(SUMMARY))}", name)
            query.summary = value
        elif name == "_elements":
            elements = tuple(e.strip() for e in value.split(",") if e.strip())
            for element in elements:
                if not _NAME.fullmatch(element):
                    raise error(400, "value", f"_elements: {element!r} is not an element name", name)
            query.elements = elements
        elif name == "_total":
            if value not in TOTAL:
                raise error(400, "value", "_total must be none, estimate or accurate", name)
            query.total = value
        elif name == "_contained":
            if value != "false":
                raise error(400, "not-supported", "_contained is not supported (only _contained=false)", name)
        elif name == "_containedType":
            raise error(400, "not-supported", "_containedType is not supported", name)
        elif name == "_cursor":
            query.cursor = value
        elif name == "__explain":
            query.explain = value.lower() == "true"
        elif name == "_type":
            if query.type is not None and len(query.types) == 1 and query.types != tuple(sorted(resource_types())):
                raise error(400, "not-supported", "_type is only allowed in a system-level search", name)
            wanted = tuple(t.strip() for t in value.split(",") if t.strip())
            for t in wanted:
                if t not in resource_types():
                    raise error(400, "value", f"_type: {t!r} is not a resource type", name)
            query.types = wanted

    def sort_key(self, key: str) -> None:
        direction = 1
        if key.startswith("-"):
            direction, key = -1, key[1:]
        if key in ("_id", "_lastUpdated"):
            self.query.sort.append((key, direction))
            return
        for type_ in self.query.types:
            if REGISTRY.get(type_, key) is None or REGISTRY.get(type_, key).type == "composite":  # type: ignore[union-attr]
                raise error(400, "not-supported", f"_sort: {key!r} is not a sortable parameter of {type_}", "_sort")
        self.query.sort.append((key, direction))

    def include(self, name: str, value: str, iterate: bool = False) -> None:
        """`Type:parameter[:target]` or `*`; `:iterate` on the name (or, as in DSTU2, at the end)."""
        reverse = name == "_revinclude"
        if len(self.query.includes) >= MAX_INCLUDES:
            raise error(400, "too-costly", f"At most {MAX_INCLUDES} _include/_revinclude are allowed", name)
        if value == "*":
            self.query.includes.append(Include("*", "*", None, iterate, reverse))
            return
        parts = value.split(":")
        if parts[-1] in ("iterate", "recurse"):
            iterate, parts = True, parts[:-1]
        if len(parts) not in (2, 3):
            raise error(400, "value", f"{name}={value!r} is not Type:parameter[:targetType]", name)
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if source != "*" and source not in resource_types():
            raise error(400, "value", f"{name}: {source!r} is not a resource type", name)
        if target is not None and target not in resource_types():
            raise error(400, "value", f"{name}: {target!r} is not a resource type", name)
        if code != "*" and source != "*":
            parameter = REGISTRY.get(source, code)
            if parameter is None or parameter.type != "reference":
                raise error(400, "not-supported", f"{name}: {source}:{code} is not a reference parameter", name)
        if not reverse and source != "*" and not iterate and source not in self.query.types:
            raise error(400, "value", f"_include={value}: {source} is not the type searched", name)
        self.query.includes.append(Include(source, code, target, iterate, reverse))

    # --- criteria ---------------------------------------------------------------------------

    def criterion(self, name: str, raw: str) -> None:
        if name.startswith("_has:"):
            self.has(name, raw)
            return
        head, _, modifier_part = name.partition(":")
        chain_names = name.split(".")
        if len(chain_names) > 1:
            self.chained(name, raw)
            return
        modifier = modifier_part or None
        found = self.lookup(head, name)
        if found is None:
            return
        parameter, special = found
        self.check_modifier(name, parameter, special, modifier)
        values = split_values(raw)
        self.check_values(name, values)
        self.query.criteria.append(
            Criterion(name, self.query.types, parameter, special, modifier, values)
        )
        self.query.used.append((name, raw))

    def lookup(self, code: str, name: str) -> tuple[SearchParameter | None, str | None] | None:
        """The parameter `code` on the searched type(s); None if unknown (lenient)."""
        if code in SPECIAL:
            return None, code
        parameters = [REGISTRY.get(t, code) for t in self.query.types]
        if not parameters or any(p is None for p in parameters):
            where = self.query.types[0] if len(self.query.types) == 1 else "every type searched"
            self.unknown(name, f"Unknown search parameter {code!r} for {where}")
            return None
        first = parameters[0]
        assert first is not None
        if any(p is not None and p.type != first.type for p in parameters):
            raise error(400, "not-supported", f"{code} has different types across the types searched", name)
        return first, None

    def check_modifier(self, name: str, parameter: SearchParameter | None, special: str | None, modifier: str | None) -> None:
        if modifier is None:
            return
        if special is not None:
            allowed: tuple[str, ...] = ("missing",) if special in ("_id", "_lastUpdated") else ()
            if special == "_id":
                allowed = ("missing", "not")
        else:
            assert parameter is not None
            allowed = MODIFIERS.get(parameter.type, ())
            if parameter.type == "reference" and modifier in resource_types():
                if modifier not in parameter.targets:
                    raise error(400, "value", f"{name}: {modifier} is not a target of {parameter.code}", name)
                return
        if modifier not in allowed:
            raise error(400, "not-supported", f"Modifier :{modifier} is not supported on {name.split(':')[0]}", name)

    def check_values(self, name: str, values: list[str]) -> None:
        if len(values) > MAX_VALUES:
            raise error(400, "too-costly", f"{name} has {len(values)} values; at most {MAX_VALUES} are allowed", name)
        for value in values:
            if len(value) > MAX_VALUE_LENGTH:
                raise error(400, "too-costly", f"A value of {name} is longer than {MAX_VALUE_LENGTH} characters", name)

    def chained(self, name: str, raw: str) -> None:
        """`subject:Patient.name=peter`, `patient.general-practitioner.name=x`.

        A link without a type follows the reference into every target type that has
        the next parameter (`Observation?subject.name=x` looks in Patient, Group, ...).
        """
        steps = name.split(".")
        if len(steps) - 1 > MAX_CHAIN:
            raise error(400, "too-costly", f"{name}: chains may be at most {MAX_CHAIN} links deep", name)
        if len(self.query.types) != 1:
            raise error(400, "not-supported", "Chained parameters need a single resource type", name)
        links: list[Link] = []
        current: tuple[str, ...] = self.query.types
        for position, step in enumerate(steps[:-1]):
            code, _, target = step.partition(":")
            next_code = steps[position + 1].split(":")[0]
            targets: set[str] = set()
            for source in current:
                parameter = REGISTRY.get(source, code)
                if parameter is None or parameter.type != "reference":
                    continue
                if target:
                    if target in parameter.targets:
                        targets.add(target)
                    continue
                targets.update(
                    t for t in parameter.targets if next_code in SPECIAL or REGISTRY.get(t, next_code) is not None
                )
            if not targets:
                self.unknown(name, f"{name}: {step!r} does not lead to a type with {next_code!r}")
                return
            links.append(Link(code, tuple(sorted(targets))))
            current = tuple(sorted(targets))
        final, _, modifier = steps[-1].partition(":")
        inner = Parser(current, self.lenient, self.max_count)
        found = inner.lookup(final, name)
        if found is None:
            self.query.ignored.extend(inner.query.ignored)
            return
        parameter, special = found
        self.check_modifier(name, parameter, special, modifier or None)
        values = split_values(raw)
        self.check_values(name, values)
        self.query.criteria.append(
            Criterion(name, current, parameter, special, modifier or None, values, tuple(links))
        )
        self.query.used.append((name, raw))

    def has(self, name: str, raw: str) -> None:
        """`_has:Observation:patient:code=1234`, nested `_has:A:p:_has:B:q:code=x`."""
        rest = name
        links: list[Has] = []
        referenced = self.query.types[0] if len(self.query.types) == 1 else None
        if referenced is None:
            raise error(400, "not-supported", "_has needs a single resource type", name)
        while rest.startswith("_has:"):
            parts = rest.split(":", 3)
            if len(parts) < 4:
                raise error(400, "invalid", f"{name}: expected _has:Type:parameter:criterion", name)
            _, type_, code, rest = parts
            if type_ not in resource_types():
                raise error(400, "value", f"{name}: {type_!r} is not a resource type", name)
            parameter = REGISTRY.get(type_, code)
            if parameter is None or parameter.type != "reference":
                raise error(400, "value", f"{name}: {code!r} is not a reference parameter of {type_}", name)
            if referenced not in parameter.targets:
                raise error(400, "value", f"{name}: {type_}.{code} does not refer to {referenced}", name)
            links.append(Has(type_, parameter, referenced))
            referenced = type_
            if len(links) > MAX_CHAIN:
                raise error(400, "too-costly", f"{name}: _has may be nested at most {MAX_CHAIN} deep", name)
        inner = Parser((referenced,), self.lenient, self.max_count)
        inner.criterion(rest, raw)
        if not inner.query.criteria:
            self.query.ignored.extend(inner.query.ignored)
            return
        criterion = inner.query.criteria[0]
        criterion.name = name
        criterion.has = tuple(links)
        self.query.criteria.append(criterion)
        self.query.used.append((name, raw))


def parse(types: tuple[str, ...], items: list[tuple[str, str]], lenient: bool, max_count: int) -> SearchQuery:
    return Parser(types, lenient, max_count).parse(items)
