"""Query (QIDO-RS and C-FIND): matching per PS3.4 C.2.2.2 and PS3.18 8.3.4 / 10.6.

A request becomes a `QidoQuery`: the target level, typed matchers per level compiled to
MongoDB filters over the normalized values (`k.*`) the index stores, the fields to
include, paging, and the parameters that were ignored (for the `Warning` header). User
values only ever become operands (`re.escape`d in patterns), never operators.

`normalize` is used both at ingest (what is stored in `k`) and here (what is compared),
so the two agree by construction:
- person names: the Alphabetic group, case-folded (PN matching is case-insensitive);
  for fuzzy matching also the accent-stripped name components (`k.<keyword>~`).
- dates `YYYYMMDD`; times `HHMMSS.ffffff` (missing parts padded), so that string order
  is time order and ranges compare as strings.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from server.dicom.levels import INSTANCE, SERIES, STUDY, TAGS, Key, Level
from server.store.blobs import is_uid
from server.store.database import regex_literal
from server.store.dicom import DicomIndex

Json = dict[str, Any]
LEVEL_NAMES = {"study": STUDY, "series": SERIES, "instance": INSTANCE}
# The levels whose keys a query at each level may use (relational queries, PS3.18 10.6.1).
SCOPES = {"study": ("study",), "series": ("study", "series"), "instance": ("study", "series", "instance")}
CONTROL = {"includefield", "fuzzymatching", "limit", "offset"}
MAX_LIMIT = 10_000  # results per request; more are paged with offset (Warning says so)
MAX_WILDCARD_VALUE = 1024  # characters of a value matched as a pattern (see _wildcards)
# The values of each integer VR (PS3.5 6.2), by VR. A match value outside its key's range
# matches nothing stored, and past 8 bytes MongoDB cannot even hold it (an OverflowError,
# a 500, before it was refused); a stored value outside it is not matchable.
INTEGER_RANGES = {
    "IS": (-(2**31), 2**31 - 1), "SL": (-(2**31), 2**31 - 1), "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1), "US": (0, 2**16 - 1),
}


class QueryError(ValueError):
    """A malformed query parameter (400)."""


# --- normalization (shared by ingest and query) ---------------------------------------


def fold(text: str) -> str:
    return text.casefold()


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def name_tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[\^\s,=]+", strip_accents(fold(text))) if t]


def normalize_time(value: str, upper: bool = False) -> str:
    """HHMMSS.ffffff; missing parts are the earliest (or, as an upper bound, latest) time."""
    digits, _, fraction = value.partition(".")
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?", digits) or (fraction and not fraction.isdigit()):
        raise QueryError(f"{value!r} is not a DICOM time (HHMMSS.FFFFFF)")
    pad = ("5959" if upper else "0000")[: 6 - len(digits)]
    return digits + pad + "." + (fraction + ("9" if upper else "0") * 6)[:6]


def normalize_date(value: str) -> str:
    value = value.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
    if not re.fullmatch(r"\d{8}", value):
        raise QueryError(f"{value!r} is not a DICOM date (YYYYMMDD)")
    return value


def normalize(level: Level, attributes: Json) -> Json:
    """The matching values of one level, from an instance's DICOM JSON."""
    keys: Json = {}
    for key in level.keys:
        if key.keyword in level.computed:
            continue  # kept up to date by the index (ModalitiesInStudy)
        element = attributes.get(key.tag)
        values = element.get("Value") if element else None
        if not values or values[0] is None:
            continue
        first = values[0]
        try:
            if key.kind == "pn":
                name = first.get("Alphabetic", "") if isinstance(first, dict) else str(first)
                keys[key.keyword] = fold(name)
                keys[key.keyword + "~"] = name_tokens(name)
            elif key.kind == "date":
                keys[key.keyword] = normalize_date(str(first))
            elif key.kind == "time":
                keys[key.keyword] = normalize_time(str(first).strip())
            elif key.kind == "number":
                keys[key.keyword] = _integer(key, str(first))
            else:
                keys[key.keyword] = str(first)
        except (QueryError, ValueError, TypeError):
            continue  # a malformed stored value is not matchable, but the instance is kept
    return keys


# --- the query --------------------------------------------------------------------------


@dataclass(slots=True)
class QidoQuery:
    level: str
    filters: dict[str, Json] = field(default_factory=dict)  # level -> MongoDB filter on k.*
    scope: dict[str, str] = field(default_factory=dict)  # the UIDs in the path (StudyInstanceUID, ...)
    include: set[str] = field(default_factory=set)  # tags to add to the default return set
    include_all: bool = False
    fuzzy: bool = False
    limit: int = 0
    offset: int = 0
    unsupported: list[str] = field(default_factory=list)


def parse(level: str, params: Iterable[tuple[str, str]], scope: dict[str, str]) -> QidoQuery:
    """Build a query at `level` from request parameters; `scope` holds the UIDs in the path."""
    query = QidoQuery(level, scope=dict(scope))
    params = _uid_lists(list(params))
    for name, value in params:
        if name == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            query.fuzzy = value.lower() == "true"
        elif name in ("limit", "offset"):
            if not value.isdigit() or len(value) > 9:
                raise QueryError(f"{name} must be a non-negative integer")
            setattr(query, name, int(value))
        elif name == "includefield":
            for item in re.split(r"[,\s]+", value.strip()):
                if item == "all":
                    query.include_all = True
                elif item:
                    query.include.add(tag_of(item))
    if query.limit == 0 or query.limit > MAX_LIMIT:
        query.limit = MAX_LIMIT
    for uid_keyword, uid in scope.items():
        add_match(query, uid_keyword, uid)
    for name, value in params:
        if name in CONTROL:
            continue
        if name.startswith("_"):
            query.unsupported.append(name)
            continue
        if "." in name:  # sequence matching (e.g. RequestAttributesSequence.X)
            for part in name.split("."):
                tag_of(part)
            query.unsupported.append(name)
            continue
        tag = tag_of(name)
        keyword = keyword_for_tag(int(tag, 16)) or tag
        if not add_match(query, keyword, value):
            query.unsupported.append(name)
            query.include.add(tag)
    return query


def _uid_lists(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A UID key given several times is one list of UIDs (one UID cannot equal two values;
    clients such as wsidicom, through requests, send a list as repeated parameters)."""
    merged: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for name, value in params:
        tag = tag_for_keyword(name) if not re.fullmatch(r"[0-9A-Fa-f]{8}", name) else int(name, 16)
        if tag is not None and _dictionary_vr(tag) == "UI" and name in seen:
            index = seen[name]
            merged[index] = (name, f"{merged[index][1]},{value}")
            continue
        seen[name] = len(merged)
        merged.append((name, value))
    return merged


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def tag_of(name: str) -> str:
    """A keyword or 8-hex-digit tag as the DICOM JSON tag string (400 if neither)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"{name!r} is neither a DICOM attribute keyword nor a tag")
    return f"{tag:08X}"


def key_for(level: str, keyword: str) -> tuple[str, Key] | None:
    for scope_level in SCOPES[level]:
        for key in LEVEL_NAMES[scope_level].keys:
            if key.keyword == keyword:
                return scope_level, key
    return None


def add_match(query: QidoQuery, keyword: str, value: str) -> bool:
    """Add one attribute match to the query; False if the attribute is not a key here."""
    found = key_for(query.level, keyword)
    if found is None:
        return False
    level, key = found
    query.include.add(key.tag)
    condition = matcher(key, value, query.fuzzy)
    if condition is not None:
        query.filters.setdefault(level, {}).setdefault("$and", []).append(condition)
    return True


def matcher(key: Key, value: str, fuzzy: bool) -> Json | None:
    """The MongoDB condition for one key, or None for universal matching (empty value)."""
    field_name = f"k.{key.keyword}"
    value = value.strip()
    if value in ("", "*"):
        return None
    if key.kind == "uid":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        for uid in uids:
            if not is_uid(uid):
                raise QueryError(f"{uid!r} is not a valid UID for {key.keyword}")
        return {field_name: uids[0]} if len(uids) == 1 else {field_name: {"$in": uids}}
    if key.kind in ("date", "time"):
        return {field_name: _range(key, value)}
    if key.kind == "number":
        return {field_name: _integer(key, value)}
    if key.kind == "pn":
        if fuzzy:
            tokens = name_tokens(value.replace("*", " ").replace("?", " "))
            if not tokens:
                return None
            return {f"{field_name}~": {"$all": [re.compile("^" + regex_literal(t)) for t in tokens]}}
        return _person_name(field_name, value)
    if key.keyword == "ModalitiesInStudy" and ("\\" in value or "," in value):
        return {field_name: {"$in": [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]}}
    return _string(field_name, value)


def _integer(key: Key, value: str) -> int:
    """The integer `value` of a `number` key (a QueryError unless it is one in the range of
    the key's VR, `INTEGER_RANGES`)."""
    shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise QueryError(f"{shown} is not an integer for {key.keyword}")
    low, high = INTEGER_RANGES[key.vr]
    if len(value.lstrip("+-0")) > len(str(high)) or not low <= int(value) <= high:
        raise QueryError(f"{shown} is outside the range of {key.keyword} ({key.vr}: {low} to {high})")
    return int(value)


def _string(field_name: str, value: str) -> Json:
    if "*" in value or "?" in value:
        return {field_name: re.compile(f"^{_wildcards(value)}$", re.DOTALL)}
    return {field_name: value}


def _wildcards(value: str) -> str:
    """A regular expression for `value` with the PS3.4 C.2.2.2.4 wildcards `*` and `?`.

    MongoDB refuses a regex past its compiled size ("regular expression is too large": a
    500 for a value of a few thousand wildcards), so a longer value than any real pattern
    is refused, and runs of `*` (which match what one does) are collapsed.
    """
    if len(value) > MAX_WILDCARD_VALUE:
        raise QueryError(f"A value matched as a pattern may have at most {MAX_WILDCARD_VALUE} characters")
    value = re.sub(r"\*+", "*", value)
    return "".join(".*" if c == "*" else "." if c == "?" else regex_literal(c) for c in value)


def _person_name(field_name: str, value: str) -> Json | None:
    """Single value or wildcard matching of a person name, case-insensitively (PS3.4
    C.2.2.2.1 allows it for PN), that ignores trailing empty components.

    PS3.5 6.2 (PN): "Trailing null components and their delimiters may be omitted", so
    "DOE^JOHN^^^" and "Doe^John" are the same name: modalities often send the first, and a
    viewer types the second. The stored (`normalize`d) form keeps the carets as received,
    so the query drops its own and accepts any number after the name; an all-caret name
    is empty, which is universal matching (C.2.2.2.3). The pattern is anchored and starts
    with the name's literal prefix, so MongoDB still answers it from the index."""
    name = fold(value).rstrip("^")
    if not name or name == "*":
        return None
    return {field_name: re.compile(f"^{_wildcards(name)}\\^*$", re.DOTALL)}


def _query_date(value: str) -> str:
    """A date in a query: the format, and a day the calendar has (PS3.5 DA). Ingest
    checks only the format (`normalize_date`), so that an instance with an impossible
    date is still stored; a query for one is an error, not a silent empty match."""
    date = normalize_date(value)
    try:
        datetime.date(int(date[:4]), int(date[4:6]), int(date[6:]))
    except ValueError:
        raise QueryError(f"{value!r} is not a date the calendar has") from None
    return date


def _query_time(value: str, upper: bool = False) -> str:
    """A time in a query: the format, and hours, minutes and seconds in range (PS3.5 TM;
    60 seconds for a leap second)."""
    time = normalize_time(value, upper)
    if time[:2] > "23" or time[2:4] > "59" or time[4:6] > "60":
        raise QueryError(f"{value!r} is not a time of day (HHMMSS)")
    return time


def _range(key: Key, value: str) -> Json | str:
    """Single value or range matching of a date or time (PS3.4 C.2.2.2.5): a range's
    start may not be after its end."""
    start = _query_date if key.kind == "date" else _query_time
    end = _query_date if key.kind == "date" else partial(_query_time, upper=True)
    if "-" not in value:
        if key.kind == "date":
            return start(value)
        return {"$gte": start(value), "$lte": end(value)}
    low, _, high = (part.strip() for part in value.partition("-"))
    bounds: Json = {}
    if low:
        bounds["$gte"] = start(low)
    if high:
        bounds["$lte"] = end(high)
    if not bounds:
        raise QueryError(f"{value!r} is not a range for {key.keyword}")
    if low and high and bounds["$gte"] > bounds["$lte"]:
        raise QueryError(f"{value!r} is not a range for {key.keyword}: it starts after it ends")
    return bounds


# --- the response -----------------------------------------------------------------------


def attributes_of(doc: Json, level: Level, query: QidoQuery, computed: Json, extra: Json | None = None) -> Json:
    """One result: the level's stored attributes, the computed ones, and includefields."""
    result: Json = dict(extra or {})
    stored: Json = doc.get("j", {})
    result.update(stored)
    if (query.include or query.include_all) and "meta" in doc:
        meta = orjson.loads(doc["meta"])
        for tag in meta if query.include_all else query.include:
            if tag in meta and tag not in result and "BulkDataURI" not in meta[tag]:
                result[tag] = meta[tag]
    for keyword, value in computed.items():
        result[TAGS[keyword]] = value
    return result


def needs_metadata(query: QidoQuery) -> bool:
    """Whether instance results need the full stored JSON (includefield beyond the index)."""
    known = INSTANCE.tags | {TAGS[k] for k in INSTANCE.computed}
    return query.include_all or any(tag not in known for tag in query.include)


def element(keyword: str, *values: Any) -> Json:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


# --- the search -------------------------------------------------------------------------

_ORDER = {"study": [("_id", 1)], "series": [("st", 1), ("k.SeriesNumber", 1), ("_id", 1)],
          "instance": [("st", 1), ("se", 1), ("k.InstanceNumber", 1), ("_id", 1)]}


async def resolve(index: DicomIndex, query: QidoQuery) -> Json:
    """The MongoDB filter at the query's level, higher-level keys resolved to UIDs first."""
    level = query.level
    filters = query.filters
    scoped: Json = {}
    if level != "study" and "study" in filters:
        studies = await index.distinct("study", "_id", filters["study"])
        scoped["st"] = {"$in": studies}
    if level == "instance" and "series" in filters:
        series = await index.distinct("series", "_id", {**filters["series"], **scoped})
        scoped["se"] = {"$in": series}
    return {**filters.get(level, {}), **scoped}


async def search(
    index: DicomIndex, query: QidoQuery, base: str, available: Callable[[str], str] | None = None
) -> tuple[list[Json], bool]:
    """Run a query against the index: at most `query.limit` results in the DICOM JSON
    model, and whether more match (the index is asked for one more than is answered: a
    page of exactly `limit` says nothing about the next). `available` maps a stored
    transfer syntax to the AvailableTransferSyntaxUID announced (QIDO-RS: the one a web
    retrieval gives, `wado.web_syntax`); without it, the stored one (C-FIND)."""
    level = query.level
    mongo_filter = await resolve(index, query)
    projection = None if level != "instance" or needs_metadata(query) else {"meta": 0, "frames": 0, "bulk": 0}
    if level == "instance" and projection is None:
        projection = {"frames": 0, "bulk": 0}
    docs = await index.find(level, mongo_filter, projection, query.offset, query.limit + 1, _ORDER[level])
    more = len(docs) > query.limit
    docs = docs[:query.limit]
    if not docs:
        return [], more
    # Higher-level attributes (PS3.18 10.6.3.3: returned for the levels the path does not fix).
    parents: dict[str, dict[str, Json]] = {}
    if level in ("series", "instance"):
        ids = list({d["st"] for d in docs})
        parents["study"] = {d["_id"]: d for d in await index.find("study", {"_id": {"$in": ids}})}
    if level == "instance":
        ids = list({d["se"] for d in docs})
        parents["series"] = {d["_id"]: d for d in await index.find("series", {"_id": {"$in": ids}})}
    results = []
    for doc in docs:
        if level == "study":
            results.append(attributes_of(doc, STUDY, query, _study_computed(doc, base)))
        elif level == "series":
            extra = _parent(parents["study"].get(doc["st"]), _study_computed, base)
            extra[TAGS["StudyInstanceUID"]] = element("StudyInstanceUID", doc["st"])
            results.append(attributes_of(doc, SERIES, query, _series_computed(doc, base), extra))
        else:
            extra = {}
            if query.include_all or "StudyInstanceUID" not in query.scope:  # Table 10.6.3-3
                extra.update(_parent(parents["study"].get(doc["st"]), _study_computed, base))
            if query.include_all or "SeriesInstanceUID" not in query.scope:  # Table 10.6.3-4
                extra.update(_parent(parents["series"].get(doc["se"]), _series_computed, base))
            extra[TAGS["StudyInstanceUID"]] = element("StudyInstanceUID", doc["st"])
            extra[TAGS["SeriesInstanceUID"]] = element("SeriesInstanceUID", doc["se"])
            series_doc = parents["series"].get(doc["se"], {})
            modality = series_doc.get("j", {}).get(TAGS["Modality"])
            if modality:
                extra[TAGS["Modality"]] = modality
            results.append(attributes_of(doc, INSTANCE, query, _instance_computed(doc, base, available), extra))
    return results, more


def _parent(doc: Json | None, computed: Callable[[Json, str], Json], base: str) -> Json:
    """A higher level's attributes in a lower level's result: the stored ones and the
    computed ones (counts, ModalitiesInStudy) but its own RetrieveURL and availability."""
    if doc is None:
        return {}
    attributes = dict(doc.get("j", {}))
    for keyword, value in computed(doc, base).items():
        if keyword not in ("RetrieveURL", "InstanceAvailability"):
            attributes[TAGS[keyword]] = value
    return attributes


def _study_computed(doc: Json, base: str) -> Json:
    modalities = doc.get("k", {}).get("ModalitiesInStudy", [])
    return {
        "ModalitiesInStudy": element("ModalitiesInStudy", *modalities),
        "NumberOfStudyRelatedSeries": element("NumberOfStudyRelatedSeries", doc.get("nser", 0)),
        "NumberOfStudyRelatedInstances": element("NumberOfStudyRelatedInstances", doc.get("n", 0)),
        "InstanceAvailability": element("InstanceAvailability", "ONLINE"),
        "RetrieveURL": element("RetrieveURL", f"{base}/studies/{doc['_id']}"),
    }


def _series_computed(doc: Json, base: str) -> Json:
    return {
        "NumberOfSeriesRelatedInstances": element("NumberOfSeriesRelatedInstances", doc.get("n", 0)),
        "InstanceAvailability": element("InstanceAvailability", "ONLINE"),
        "RetrieveURL": element("RetrieveURL", f"{base}/studies/{doc['st']}/series/{doc['_id']}"),
    }


def _instance_computed(doc: Json, base: str, available: Callable[[str], str] | None) -> Json:
    return {
        "AvailableTransferSyntaxUID": element("AvailableTransferSyntaxUID", available(doc["ts"]) if available else doc["ts"]),
        "InstanceAvailability": element("InstanceAvailability", "ONLINE"),
        "RetrieveURL": element(
            "RetrieveURL", f"{base}/studies/{doc['st']}/series/{doc['se']}/instances/{doc['_id']}"
        ),
    }


def encode(results: list[Json]) -> bytes:
    return orjson.dumps(results, option=orjson.OPT_SORT_KEYS)


def encode_one(result: Json) -> bytes:
    return orjson.dumps(result, option=orjson.OPT_SORT_KEYS)


def element_or_empty(keyword: str, value: Any) -> Json:
    return element(keyword, value) if value else element(keyword)
