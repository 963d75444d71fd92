"""The search interaction (search.html): type, system and compartment searches.

A request is parsed into a typed query, compiled to a filter, and run as one indexed
query for the page (keyset paging: the cursor holds the sort values of the page's edge,
so deep pages cost what the first does and stay stable while data changes), plus a
count for `Bundle.total`, plus the `_include`/`_revinclude` queries. The Bundle is built
from the stored bytes; only `_summary`/`_elements` re-serialize a resource.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from bson import json_util

from server.fhir import jsonio, structure
from server.fhir.bundle import Bundle, Entry
from server.fhir.definitions import resource_types
from server.fhir.outcome import Issue, error, outcome_bytes
from server.fhir.search import query as parsing
from server.fhir.search.compile import Compiler, all_of, parse_date, split_prefix
from server.fhir.search.parameters import REGISTRY, compartments
from server.fhir.search.query import Include, SearchQuery, unescape
from server.fhir.search.terms import NARROW_DATE_SPAN
from server.store.search import QueryTooCostly, SearchStore

MAX_INCLUDED = 1000
COUNT_LIMIT = 1000
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@dataclass
class SearchRequest:
    """What the routes hand over: where the search runs and its parameters."""

    types: tuple[str, ...]
    items: list[tuple[str, str]]
    path: str  # relative to the base, for links ("Patient", "Patient/1/Observation", "")
    lenient: bool = False
    compartment: tuple[str, str] | None = None
    page_size: int = 50
    max_page_size: int = 1000


@dataclass
class Page:
    docs: list[dict[str, Any]]
    previous: str | None = None
    next: str | None = None
    included: list[dict[str, Any]] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


# --- parsing ---------------------------------------------------------------------------------


def parse_request(request: SearchRequest) -> SearchQuery:
    types = request.types
    types_given = [v for k, v in request.items if k == "_type"]
    wanted = tuple(t.strip() for v in types_given for t in v.split(",") if t.strip())
    if types_given and len(types) > 1:
        unknown = [t for t in wanted if t not in resource_types()]
        if unknown:
            raise error(400, "value", f"_type: {', '.join(unknown)} is not a resource type", "_type")
        types = wanted
    elif types_given and set(wanted) != set(types):
        # a search of one type cannot widen or change it: answering with that type's
        # resources as if _type had been heard would mislead
        raise error(400, "value", f"_type: this is a search of {types[0]} alone", "_type")
    items = [(k, v) for k, v in request.items if k != "_type"]
    parsed = parsing.parse(types, items, request.lenient, request.max_page_size)
    if types_given:
        parsed.used.append(("_type", ",".join(types)))
    return parsed


# --- sorting and cursors ---------------------------------------------------------------------


DEFAULT_ORDER = [("s.o.date", 1)]


def sort_fields(query: SearchQuery) -> list[tuple[str, int]]:
    """The MongoDB sort: the `_sort` keys, by default the `date` parameter (the order the
    `search_keys` index holds), and `_id` last, in the first key's direction, so every
    order is total (keyset cursors need that) and `-date` can walk the index backwards."""
    fields = [
        ("_id" if key == "_id" else "ts" if key == "_lastUpdated" else f"s.o.{key}", direction)
        for key, direction in query.sort
    ] or list(DEFAULT_ORDER)
    if not any(f == "_id" for f, _ in fields):
        fields.append(("_id", fields[0][1]))
    return fields


def sort_value(doc: dict[str, Any], name: str) -> Any:
    if name == "_id":
        return doc["_id"]
    if name == "ts":
        return doc["ts"]
    return doc.get("s", {}).get("o", {}).get(name[4:])


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):  # naive from a page (SearchStore.page): UTC
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return {"d": int(aware.timestamp() * 1000)}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        millis = value.get("d")
        if not isinstance(millis, int):
            raise ValueError("bad cursor value")
        return datetime.fromtimestamp(millis / 1000, UTC)
    if value is not None and not isinstance(value, (str, int, float)):
        raise ValueError("bad cursor value")
    return value


def encode_cursor(direction: str, doc: dict[str, Any], fields: list[tuple[str, int]]) -> str:
    raw = orjson.dumps([direction, [_encode_value(sort_value(doc, f)) for f, _ in fields]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, fields: list[tuple[str, int]]) -> tuple[str, list[Any]]:
    try:
        direction, values = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if direction not in ("n", "p") or not isinstance(values, list) or len(values) != len(fields):
            raise ValueError("bad cursor")
        return direction, [_decode_value(v) for v in values]
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise error(400, "value", "_cursor is not a cursor this server issued for this search", "_cursor") from None


def keyset(fields: list[tuple[str, int]], values: list[Any]) -> dict[str, Any]:
    """Documents strictly after `values` in the order of `fields`."""
    alternatives = []
    for position, (name, direction) in enumerate(fields):
        equal = {fields[i][0]: values[i] for i in range(position)}
        value = values[position]
        if direction == 1:
            after: dict[str, Any] | None = {name: {"$ne": None}} if value is None else {name: {"$gt": value}}
        else:
            after = None if value is None else {"$or": [{name: {"$lt": value}}, {name: None}]}
        if after is not None:
            alternatives.append(all_of([equal, after]) if equal else after)
    return {"$or": alternatives} if alternatives else {"_id": {"$in": []}}


LOWER_BOUND_PREFIXES = frozenset({"eq", "ge", "gt", "sa"})  # each implies a value at or after the date's start


def date_lower_bound(query: SearchQuery) -> datetime | None:
    """The latest instant that every match has some `date` value reaching (an end at or
    after it), from the query's plain `date` criteria; None when they give none."""
    bound: datetime | None = None
    for criterion in query.criteria:
        parameter = criterion.parameter
        if parameter is None or parameter.code != "date" or parameter.type != "date":
            continue
        if criterion.modifier or criterion.chain or criterion.has:
            continue
        starts = []
        for value in criterion.values:
            prefix, text = split_prefix(unescape(value), criterion.name)
            if prefix not in LOWER_BOUND_PREFIXES:
                break
            starts.append(parse_date(text, criterion.name)[0])
        else:
            if starts and (bound is None or min(starts) > bound):
                bound = min(starts)
    return bound


def date_bounded(where: dict[str, Any], fields: list[tuple[str, int]], bound: datetime | None) -> dict[str, Any]:
    """`where` split so that an ascending walk of the `date` order can start near `bound`.

    A resource matching a lower bound on `date` has a value ending at or after it, so a
    resource whose `date` values span at most NARROW_DATE_SPAN has its order key (the
    earliest start) at most that span before the bound; the wider ones (listed in `s.w`)
    have their own partial index. Without this split the walk starts at the earliest
    date of every resource with the search's key terms.
    """
    if bound is None or fields[0] != ("s.o.date", 1):
        return where
    return {"$or": [
        all_of([where, {"s.o.date": {"$gte": bound - NARROW_DATE_SPAN}}]),
        all_of([where, {"s.w": "date"}]),
    ]}


# --- the search -------------------------------------------------------------------------------


class Search:
    def __init__(self, db: SearchStore, base: str) -> None:
        self.db = db
        self.base = base

    async def filter(self, query: SearchQuery, compartment: tuple[str, str] | None) -> dict[str, Any]:
        condition = await Compiler(self.db, self.base).query_filter(query)
        if compartment is not None:
            condition = all_of([condition, compartment_filter(compartment, query.types)])
        return condition

    async def run(self, request: SearchRequest) -> bytes:
        query = parse_request(request)
        try:
            return await self._run(request, query)
        except QueryTooCostly:
            raise error(400, "too-costly", "The search took too long; add criteria to narrow it") from None

    async def _run(self, request: SearchRequest, query: SearchQuery) -> bytes:
        condition = await self.filter(query, request.compartment)
        fields = sort_fields(query)
        count = query.count if query.count is not None else request.page_size
        summary_count = query.summary == "count" or count == 0
        if summary_count:
            page, total = Page([]), await self.total(condition, query, True)
        elif query.cursor is None and query.total != "accurate":
            page = await self.included_page(condition, fields, count, query)
            # a first page that is not full is the whole result: nothing left to count
            total = len(page.docs) if page.next is None and query.total != "none" else await self.total(condition, query, False)
        elif self.db.session is not None:  # a session runs one operation at a time
            page = await self.included_page(condition, fields, count, query)
            total = await self.total(condition, query, False)
        else:  # the page (with its includes) and the count side by side
            page, total = await asyncio.gather(
                self.included_page(condition, fields, count, query), self.total(condition, query, False)
            )
        entries = [self.entry(doc, "match", query) for doc in page.docs]
        entries += [self.entry(doc, "include", query) for doc in page.included]
        issues = list(page.issues)
        if query.ignored:
            issues.append(Issue("not-supported", f"Ignored unknown parameters: {', '.join(query.ignored)}", "warning"))
        if query.explain:
            run = date_bounded(condition, fields, date_lower_bound(query))
            explained = await self.db.explain(run, fields, count + 1)
            issues.append(Issue("informational", json_util.dumps({"filter": run, "sort": fields, **explained}), "information"))
        if issues:
            entries.append(Entry(None, outcome_bytes(issues), {"mode": "outcome"}))
        links = self.links(request, query, count, page)
        return Bundle("searchset", entries, total, links).to_bytes()

    async def total(self, condition: dict[str, Any], query: SearchQuery, summary_count: bool) -> int | None:
        """Bundle.total past a full first page: exact for `_summary=count` and
        `_total=accurate`; for `_total=estimate` only where counting reads the index keys
        alone (key terms, no ranges or text), on the first page, when at most COUNT_LIMIT
        resources match; else (and by default) left out. Counting cost a page query as
        much again (walking up to COUNT_LIMIT index keys, then often discarding the
        number), so a search pays for it only when the client asks."""
        if summary_count or query.total == "accurate":
            return await self.db.count(condition)
        if query.total != "estimate" or query.cursor is not None or not index_only(condition):
            return None
        total = await self.db.count_keys(condition, COUNT_LIMIT + 1)
        return total if total <= COUNT_LIMIT else None

    async def included_page(self, condition: dict[str, Any], fields: list[tuple[str, int]], count: int, query: SearchQuery) -> Page:
        page = await self.page(condition, fields, count, query)
        await self.include(page, query)
        return page

    async def page(self, condition: dict[str, Any], fields: list[tuple[str, int]], count: int, query: SearchQuery) -> Page:
        direction, values = ("n", None) if query.cursor is None else decode_cursor(query.cursor, fields)
        if direction == "n":
            where = condition if values is None else all_of([condition, keyset(fields, values)])
            where = date_bounded(where, fields, date_lower_bound(query))
            docs = await self.db.page(where, fields, count + 1, bool(query.includes))
            more = len(docs) > count
            docs = docs[:count]
            page = Page(docs)
            if more and docs:
                page.next = encode_cursor("n", docs[-1], fields)
            if values is not None and docs:
                page.previous = encode_cursor("p", docs[0], fields)
            return page
        backwards = [(f, -d) for f, d in fields]
        docs = await self.db.page(all_of([condition, keyset(backwards, values)]), backwards, count + 1, bool(query.includes))
        more = len(docs) > count
        docs = list(reversed(docs[:count]))
        page = Page(docs)
        if docs:
            page.next = encode_cursor("n", docs[-1], fields)
            if more:
                page.previous = encode_cursor("p", docs[0], fields)
        return page

    # --- includes ----------------------------------------------------------------------------

    async def include(self, page: Page, query: SearchQuery) -> None:
        """Add `_include`/`_revinclude` targets (`:iterate` repeatedly), at most MAX_INCLUDED."""
        if not query.includes or not page.docs:
            return
        seen = {doc["_id"] for doc in page.docs}
        frontier = page.docs
        first = True
        while frontier:
            found: list[dict[str, Any]] = []
            for spec in query.includes:
                if not first and not spec.iterate:
                    continue
                docs = await (self.reverse_targets(spec, frontier) if spec.reverse else self.db.by_ids(forward_targets(spec, frontier)))
                for doc in docs:
                    if doc["_id"] not in seen:
                        seen.add(doc["_id"])
                        found.append(doc)
            if len(page.included) + len(found) > MAX_INCLUDED:
                found = found[: MAX_INCLUDED - len(page.included)]
                page.included.extend(found)
                page.issues.append(Issue(
                    "too-costly", f"Included resources were limited to {MAX_INCLUDED}; the Bundle does not hold them all", "warning",
                ))
                return
            page.included.extend(found)
            frontier = found
            first = False

    async def reverse_targets(self, spec: Include, frontier: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = [doc["_id"] for doc in frontier if spec.target is None or doc["t"] == spec.target]
        if not keys:
            return []
        if spec.source == "*" or spec.parameter == "*":
            codes = reference_codes(None if spec.source == "*" else spec.source)
        else:
            codes = [spec.parameter]
        terms = [f"{code}>{key}" for code in codes for key in keys]
        condition: dict[str, Any] = {"deleted": False, "s.k": {"$in": terms}}
        if spec.source != "*":
            condition["t"] = spec.source
        return await self.db.page(condition, [("_id", 1)], MAX_INCLUDED + 1, with_keys=True)

    # --- the Bundle --------------------------------------------------------------------------

    def entry(self, doc: dict[str, Any], mode: str, query: SearchQuery) -> Entry:
        key = doc["_id"]
        body = bytes(doc["body"])
        if query.summary in ("true", "text", "data") or query.elements:
            body = subset(body, doc["t"], query, mode)
        return Entry(f"{self.base}/{key}", body, {"mode": mode})

    def links(self, request: SearchRequest, query: SearchQuery, count: int, page: Page) -> list[tuple[str, str]]:
        base_url = f"{self.base}/{request.path}" if request.path else self.base
        kept = [(k, v) for k, v in request.items if k not in ("_cursor", "_count", "_type") and k not in query.ignored]
        kept = [(k, v) for k, v in kept if k in parsing.RESULT_PARAMETERS or (k, v) in query.used]
        kept += [item for item in query.used if item[0] == "_type"]
        common = [*kept, ("_count", str(count))]
        links = [("self", f"{base_url}?{urlencode(common + ([('_cursor', query.cursor)] if query.cursor else []))}")]
        if page.next:
            links.append(("next", f"{base_url}?{urlencode(common + [('_cursor', page.next)])}"))
        if page.previous:
            links.append(("previous", f"{base_url}?{urlencode(common + [('_cursor', page.previous)])}"))
        return links


def index_only(condition: dict[str, Any]) -> bool:
    """Whether the filter can be evaluated from the `search_keys` index alone."""
    for key, value in condition.items():
        if key in ("$and", "$or"):
            if not all(index_only(c) for c in value):
                return False
        elif key not in ("t", "s.k"):
            return False
    return True


def forward_targets(spec: Include, frontier: list[dict[str, Any]]) -> list[str]:
    targets: list[str] = []
    for doc in frontier:
        if spec.source != "*" and doc["t"] != spec.source:
            continue
        codes = reference_codes(doc["t"]) if spec.parameter == "*" else [spec.parameter]
        prefixes = tuple(f"{code}>" for code in codes)
        for key in doc.get("s", {}).get("k", []):
            if key.startswith(prefixes):
                target = key.split(">", 1)[1]
                parts = target.split("/")
                if len(parts) == 2 and parts[0] in resource_types() and (spec.target is None or parts[0] == spec.target):
                    targets.append(target)
    return sorted(set(targets))


def reference_codes(type_: str | None) -> list[str]:
    types = [type_] if type_ else sorted(REGISTRY.standard)
    return sorted({p.code for t in types for p in REGISTRY.for_type(t).values() if p.type == "reference"})


def compartment_filter(compartment: tuple[str, str], types: tuple[str, ...]) -> dict[str, Any]:
    """Resources in `Compartment/id`: linked by one of the compartment's parameters."""
    kind, id_ = compartment
    members = compartments().get(kind)
    if members is None:
        raise error(404, "not-found", f"{kind} is not a compartment (R4 defines {', '.join(sorted(compartments()))})")
    alternatives: list[dict[str, Any]] = []
    for type_ in types:
        codes = [c for c in members.get(type_, []) if c != "{def}"]
        if codes:
            alternatives.append({"t": type_, "s.k": {"$in": [f"{code}>{kind}/{id_}" for code in codes]}})
        if type_ == kind:
            alternatives.append({"_id": f"{kind}/{id_}"})
    if not alternatives:
        if len(types) == 1:
            raise error(400, "invalid", f"{types[0]} is not in the {kind} compartment")
        return {"_id": {"$in": []}}
    return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}


def compartment_types(kind: str) -> tuple[str, ...]:
    members = compartments().get(kind)
    if members is None:
        raise error(404, "not-found", f"{kind} is not a compartment")
    return tuple(sorted(set(members) | {kind}))


# --- _summary and _elements ------------------------------------------------------------------


def _summary_of(node: Any, element: structure.Element) -> Any:
    if isinstance(node, list):
        return [_summary_of(item, element) for item in node]
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, value in node.items():
        child = structure.child(element, key)
        if child is None or not child.summary:
            continue
        if child.types and child.types[0] in ("Resource",):
            kept[key] = value
        elif child.defines_children or (child.types and child.types[0][:1].isupper()):
            kept[key] = _summary_of(value, child)
        else:
            kept[key] = value
    return kept


def subset(body: bytes, type_: str, query: SearchQuery, mode: str) -> bytes:
    """The resource reduced for `_summary` or `_elements`, tagged SUBSETTED."""
    resource = jsonio.loads(body)
    root = structure.root(type_)
    assert root is not None
    mandatory = {
        key for key in resource if (e := structure.child(root, key)) is not None and e.min > 0
    }
    if query.summary == "true":
        reduced = _summary_of(resource, root)
    elif query.summary == "text":
        reduced = {k: v for k, v in resource.items() if k in ("text", "id", "meta") or k in mandatory}
    elif query.summary == "data":
        reduced = {k: v for k, v in resource.items() if k != "text"}
    elif query.elements and mode == "match":
        wanted = set(query.elements) | mandatory | {"id", "meta"}
        reduced = {k: v for k, v in resource.items() if k in wanted or any(k == f"_{w}" for w in wanted)}
    else:
        return body
    reduced = {"resourceType": type_, **reduced}
    meta = dict(reduced.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    reduced["meta"] = meta
    return jsonio.dumps(reduced)
