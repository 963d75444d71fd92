"""A typed search query compiled to a MongoDB filter over the search terms.

Only this module writes filters, and it writes them from parsed values: user text only
ever appears as a value compared with `$eq`/`$in`, or inside a regular expression after
`re.escape`, anchored after the parameter code. A `$` or `{"$gt": ""}` in a query is data.

Chains (`subject.name=x`), reverse chains (`_has`) and `_list` are resolved here by
running the inner search first and matching its resource ids, bounded by `MAX_IDS`: a
chain that would need more ids answers 400 (too-costly) rather than running unbounded.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from server.fhir import jsonio
from server.fhir.outcome import error
from server.fhir.search import terminology, terms
from server.fhir.search.parameters import COMPARATORS, REGISTRY, SearchParameter
from server.fhir.search.query import Criterion, SearchQuery, split_unescaped, unescape
from server.fhir.search.terms import MAX_KEY, date_range, normalize, reference_literal
from server.fhir.search.ucum import canonical_range
from server.store.database import regex_literal
from server.store.search import SearchStore
from terminology.builtin import UCUM

MAX_IDS = 10_000
Filter = dict[str, Any]


def anchored(prefix: str, rest: str = "") -> Filter:
    """A regex condition on `s.k` that starts with the literal `prefix` (index-bounded)."""
    return {"s.k": {"$regex": "^" + regex_literal(prefix) + rest}}


def any_of(conditions: list[Filter]) -> Filter:
    keys = [c["s.k"] for c in conditions if set(c) == {"s.k"} and isinstance(c["s.k"], str)]
    others = [c for c in conditions if not (set(c) == {"s.k"} and isinstance(c["s.k"], str))]
    merged = others + ([{"s.k": {"$in": keys}}] if len(keys) > 1 else [{"s.k": keys[0]}] if keys else [])
    return merged[0] if len(merged) == 1 else {"$or": merged}


def all_of(conditions: list[Filter]) -> Filter:
    conditions = [c for c in conditions if c]
    if not conditions:
        return {}
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


# --- values ---------------------------------------------------------------------------------


def split_prefix(value: str, name: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in COMPARATORS and (value[2].isdigit() or value[2] in "-."):
        return value[:2], value[2:]
    return "eq", value


def parse_date(text: str, name: str) -> tuple[datetime, datetime]:
    found = date_range(text)
    if found is None:
        raise error(400, "value", f"{name}: {text!r} is not a FHIR date (YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]])", name)
    return found


def parse_number(text: str, name: str) -> tuple[float, float, float]:
    """(value, low, high): the value and the range its precision implies (`100` -> 99.5..100.5)."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise error(400, "value", f"{name}: {text!r} is not a number", name) from None
    if not number.is_finite():
        raise error(400, "value", f"{name}: {text!r} is not a finite number", name)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    try:
        # past the decimal context's exponent limits (`1e99999999`) scaleb and the sums
        # raise InvalidOperation: such a number is refused, not a 500
        half = Decimal(5).scaleb(exponent - 1)
        return float(number), float(number - half), float(number + half)
    except InvalidOperation:
        raise error(400, "value", f"{name}: {text!r} is out of range", name) from None


def range_condition(prefix: str, low: Any, high: Any, lo: str, hi: str, approx: Any) -> Filter:
    """Conditions on a stored range [lo, hi] for a search range [low, high] (search.html#prefix).

    `ge` is "some of the target lies at or after the search range's start" (`hi >= low`):
    the union of the spec's "the range above the search value intersects the target" and
    "the search range contains the target", with a target that overlaps the search range's
    end; `le` mirrors it (`lo <= high`). Each is one comparison: written as the `$or` of
    those cases, MongoDB's `$elemMatch` made a date-range search 15% slower.
    `approx` is the range `ap` matches.
    """
    if prefix == "eq":
        return {lo: {"$gte": low}, hi: {"$lte": high}}
    if prefix == "ne":
        return {"$or": [{lo: {"$lt": low}}, {hi: {"$gt": high}}]}
    if prefix == "gt":
        return {hi: {"$gt": high}}
    if prefix == "lt":
        return {lo: {"$lt": low}}
    if prefix == "ge":
        return {hi: {"$gte": low}}
    if prefix == "le":
        return {lo: {"$lte": high}}
    if prefix == "sa":
        return {lo: {"$gt": high}}
    if prefix == "eb":
        return {hi: {"$lt": low}}
    low_ap, high_ap = approx
    return {lo: {"$lte": high_ap}, hi: {"$gte": low_ap}}


def date_condition(prefix: str, text: str, name: str, lo: str = "lo", hi: str = "hi") -> Filter:
    low, high = parse_date(text, name)
    now = datetime.now(UTC)
    gap = max(abs(now - low), timedelta(days=1)) * 0.1
    return range_condition(prefix, low, high, lo, hi, approximate_dates(low, high, gap))


def earliest_start_before(p: str, prefix: str, text: str, name: str) -> Filter:
    """`le`/`lt` on a date parameter as a condition on its sort key.

    Some value starts at or before the end of the search value (`lo <= high`; `lt`:
    before its start) exactly when the earliest start does, and the earliest start is
    the parameter's sort key (`s.o.<code>`, terms.index). For `date` that key is in the
    `search_keys` index, so the condition bounds the index walk instead of being checked
    on each fetched document: `date=ge2001&date=le2003&_sort=date` reads no document
    past 2003.
    """
    low, high = parse_date(text, name)
    return {f"s.o.{p}": {"$lte": high} if prefix == "le" else {"$lt": low}}


def approximate_dates(low: datetime, high: datetime, gap: timedelta) -> tuple[datetime, datetime]:
    """`ap`'s range, [low - gap, high + gap], kept within the dates Python can hold.

    Every prefix computes it, so without the bounds a date near year 1 or 9999
    (`birthdate=sa9999`, `date=eb0001`) raised OverflowError: a 500 for a valid query.
    """
    return (
        low - gap if low - terms.MIN_DATE > gap else terms.MIN_DATE,
        high + gap if terms.MAX_DATE - high > gap else terms.MAX_DATE,
    )


def number_condition(prefix: str, text: str, name: str, lo: str = "lo", hi: str = "hi") -> Filter:
    value, low, high = parse_number(text, name)
    return precise_condition(prefix, value, low, high, lo, hi)


def precise_condition(prefix: str, value: float, low: float, high: float, lo: str, hi: str) -> Filter:
    """Conditions on a stored number range [lo, hi] for a number search value (search.html#number).

    Only `eq`, `ne` and `ap` use the range the value's precision implies, and that range
    is half-open ("`100` ... the range [99.5 ... 100.5)"), so `99` does not find 99.5.
    "When a comparison prefix in the set lgt, lt, ge, le, sa & eb is provided, the implicit
    precision of the number is ignored, and they are treated as if they have arbitrarily
    high precision": `le1e2` is `<= 100` exactly, not `<= 150`.
    """
    if prefix == "eq":
        return {lo: {"$gte": low}, hi: {"$lt": high}}
    if prefix == "ne":
        return {"$or": [{lo: {"$lt": low}}, {hi: {"$gte": high}}]}
    gap = abs(value) * 0.1
    return range_condition(prefix, value, value, lo, hi, (value - gap, value + gap))


def quantity_condition(raw: str, name: str, suffix: str = "") -> Filter:
    """`[prefix]number[|system|code]` on range entries (fields lo, hi, s, c + suffix)."""
    parts = [unescape(p) for p in split_unescaped(raw, "|")]
    if len(parts) not in (1, 3):
        raise error(400, "value", f"{name}: {raw!r} is not [prefix]number|system|code", name)
    prefix, number = split_prefix(parts[0], name)
    system, code = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
    lo, hi, s, c = ("lo", "hi", "s", "c") if not suffix else (f"l{suffix}", f"h{suffix}", f"s{suffix}", f"c{suffix}")
    if system == UCUM and code:
        value, low, high = parse_number(number, name)
        converted = canonical_range(low, high, code)
        exact = canonical_range(value, value, code)
        if converted is not None and exact is not None:
            condition = precise_condition(prefix, exact[0], converted[0], converted[1], lo, hi)
            return {**condition, s: "~", c: converted[2]} if "$or" not in condition else {"$and": [condition, {s: "~", c: converted[2]}]}
    condition = number_condition(prefix, number, name, lo, hi)
    extra: Filter = {}
    if system:
        extra[s] = system
    if code:
        extra[c] = code
    if not system and not code:
        extra[s] = {"$ne": "~"}
    return {"$and": [condition, extra]} if "$or" in condition else {**condition, **extra}


def token_key(raw: str, name: str) -> tuple[str, bool]:
    """A token value as a key (without the parameter code); True if it is a prefix."""
    parts = split_unescaped(raw, "|")
    if len(parts) == 1:
        return "#" + unescape(parts[0])[:MAX_KEY], False
    if len(parts) != 2:
        raise error(400, "value", f"{name}: {raw!r} is not [system]|[code]", name)
    system, code = unescape(parts[0]), unescape(parts[1])[:MAX_KEY]
    if not code:
        return f"|{system}|", True
    return f"|{system}|{code}", False


# --- the compiler ---------------------------------------------------------------------------


class Compiler:
    def __init__(self, db: SearchStore, base_url: str, session: Any = None) -> None:
        self.db = db
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def query_filter(self, query: SearchQuery) -> Filter:
        parts = [await self.criterion(c) for c in query.criteria]
        texts = [p for p in parts if "$text" in p]
        if len(texts) > 1:
            raise error(400, "not-supported", "Only one of _text and _content may be used in a search")
        live = any(requires_terms(part) for part in parts)
        return all_of([type_filter(query.types, live), *parts])

    async def criterion(self, criterion: Criterion) -> Filter:
        if criterion.chain:
            return await self.chained(criterion)
        if criterion.has:
            return await self.reverse_chained(criterion)
        return await self.leaf_on_types(criterion, criterion.types)

    async def leaf_on_types(self, criterion: Criterion, types: tuple[str, ...]) -> Filter:
        """The criterion on each type (its parameter may be defined per type)."""
        if criterion.special is not None:
            return await self.special(criterion, types)
        filters: dict[str, Filter] = {}
        for type_ in types:
            parameter = REGISTRY.get(type_, criterion.parameter.code) if criterion.parameter else None
            if parameter is None:
                continue
            filters[type_] = await self.leaf(parameter, criterion)
        distinct = {repr(f) for f in filters.values()}
        if len(distinct) == 1:
            return next(iter(filters.values()))
        return {"$or": [{"t": t, **f} if "$or" not in f else {"$and": [{"t": t}, f]} for t, f in filters.items()]}

    async def leaf(self, parameter: SearchParameter, criterion: Criterion) -> Filter:
        p, modifier, name = parameter.code, criterion.modifier, criterion.name
        if modifier == "missing":
            if len(criterion.values) != 1 or criterion.values[0] not in ("true", "false"):
                raise error(400, "value", f"{name} must be true or false", name)
            present = presence(parameter)
            return {"$nor": [present]} if criterion.values[0] == "true" else present
        values = [v for v in criterion.values if v != ""]
        if not values:
            raise error(400, "value", f"{name} has no value", name)
        kind = parameter.type
        if kind == "token":
            return await self.token(p, modifier, values, name)
        if kind == "string":
            return any_of([self.string(p, modifier, unescape(v)) for v in values])
        if kind == "uri":
            return any_of([self.uri(p, modifier, unescape(v)) for v in values])
        if kind == "reference":
            return any_of([c for v in values for c in self.reference(parameter, modifier, unescape(v), name)])
        if kind == "composite":
            return any_of([await self.composite(parameter, v, name) for v in values])
        if kind == "special":
            return {"$or": [near(unescape(v), name) for v in values]}
        conditions = []
        for value in values:
            if kind == "date":
                prefix, text = split_prefix(unescape(value), name)
                if prefix in ("le", "lt"):
                    conditions.append(earliest_start_before(p, prefix, text, name))
                    continue
                condition = date_condition(prefix, text, name)
            elif kind == "number":
                prefix, text = split_prefix(unescape(value), name)
                condition = number_condition(prefix, text, name)
            else:
                condition = quantity_condition(value, name)
            conditions.append({"s.v": {"$elemMatch": {"p": p, **condition}}})
        return conditions[0] if len(conditions) == 1 else {"$or": conditions}

    async def token(self, p: str, modifier: str | None, values: list[str], name: str) -> Filter:
        conditions: list[Filter] = []
        for raw in values:
            if modifier == "text":
                conditions.append(anchored(f"{p}~{normalize(unescape(raw))}"))
            elif modifier == "of-type":
                parts = [unescape(x) for x in split_unescaped(raw, "|")]
                if len(parts) != 3 or not all(parts):
                    raise error(400, "value", f"{name}: :of-type takes system|code|value", name)
                conditions.append({"s.k": f"{p}!{parts[0]}|{parts[1]}|{parts[2][:MAX_KEY]}"})
            elif modifier in ("in", "not-in", "above", "below"):
                conditions.extend(await self.terminology(p, modifier, raw, name))
            else:
                key, prefix = token_key(raw, name)
                conditions.append(anchored(p + key) if prefix else {"s.k": p + key})
        condition = any_of(conditions)
        if modifier in ("not", "not-in"):
            return {"$nor": [condition]}
        return condition

    async def terminology(self, p: str, modifier: str, raw: str, name: str) -> list[Filter]:
        engine = terminology.engine(modifier, name)
        try:
            if modifier in ("in", "not-in"):
                concepts = await engine.expand(self.relative(unescape(raw)), MAX_IDS)
            else:
                parts = [unescape(x) for x in split_unescaped(raw, "|")]
                if len(parts) != 2 or not all(parts):
                    raise error(400, "value", f"{name}: :{modifier} takes system|code", name)
                concepts = [(parts[0], c) for c in await engine.subsumption(parts[0], parts[1], modifier, MAX_IDS)]
        except terminology.Refused as exc:
            raise error(400, exc.code, f"{name}: {exc}", name) from None
        if len(concepts) > MAX_IDS:
            raise error(400, "too-costly", f"{name}: the value set has more than {MAX_IDS} codes", name)
        # a `code` element (Patient.gender) has its system implicitly, from its binding, and
        # is indexed without one: it matches by the code alone
        keys = {f"{p}|{system}|{code}" for system, code in concepts} | {f"{p}||{code}" for _, code in concepts}
        return [{"s.k": {"$in": sorted(keys)}}]

    def string(self, p: str, modifier: str | None, value: str) -> Filter:
        if modifier == "exact":
            return {"s.k": f"{p}={value[:MAX_KEY]}"}
        if modifier == "contains":
            return anchored(f"{p}:", ".*" + regex_literal(normalize(value)))
        return anchored(f"{p}:{normalize(value)}")

    def uri(self, p: str, modifier: str | None, value: str) -> Filter:
        if modifier == "below":
            # path segments (search.html, uri): the value itself or the value and `/...`;
            # `http://acme.org/fhir` does not find `http://acme.org/fhirx`
            return anchored(f"{p}>{value.removesuffix('/')}", "(/|$)")
        if modifier == "above":
            return {"s.k": {"$in": [f"{p}>{u}" for u in uri_ancestors(value)]}}
        return {"s.k": f"{p}>{value[:MAX_KEY]}"}

    def relative(self, reference: str) -> str:
        """A literal reference to this server's own base made relative (`Type/id`)."""
        if self.base_url and reference.startswith(self.base_url + "/"):
            return reference[len(self.base_url) + 1 :]
        return reference

    def reference(self, parameter: SearchParameter, modifier: str | None, value: str, name: str) -> list[Filter]:
        p = parameter.code
        if modifier == "identifier":
            parts = [unescape(x) for x in split_unescaped(value, "|")]
            if len(parts) == 1:
                return [{"s.k": f"{p}@#{parts[0][:MAX_KEY]}"}]
            if len(parts) == 2:
                return [{"s.k": f"{p}@{parts[0]}|{parts[1][:MAX_KEY]}"}]
            raise error(400, "value", f"{name}: :identifier takes [system|]value", name)
        if modifier in ("above", "below"):
            return [self.uri(p, modifier, value)]
        value = self.relative(value)
        if modifier is not None:  # :Type
            target_id = value.split("/")[-1] if "/" in value else value
            if "/" in value and value.split("/")[-2] != modifier:
                raise error(400, "value", f"{name}: {value} is not a {modifier}", name)
            return [{"s.k": f"{p}>{modifier}/{target_id}"}]
        if "/" in value or ":" in value:
            forms = reference_literal(value)
            return [{"s.k": {"$in": [f"{p}>{f}" for f in forms]}}]
        return [{"s.k": {"$in": [f"{p}>{t}/{value}" for t in parameter.targets]}}]

    async def composite(self, parameter: SearchParameter, raw: str, name: str) -> Filter:
        """Stored composite entries (nodes below the resource) or, for the resource itself,
        each component's own parameter (see terms.Plan.root_components)."""
        parts = split_unescaped(raw, "$")
        if len(parts) != len(parameter.components):
            raise error(400, "value", f"{name}: expected {len(parameter.components)} values joined by $", name)
        plan = terms.plan_of(parameter)
        alternatives = []
        if plan.components:
            alternatives.append(self.composite_entries(parameter, parts, name))
        if plan.root_components:
            conditions = []
            for code, part in zip(plan.root_components, parts, strict=True):
                component = REGISTRY.get(parameter.base, code)
                assert component is not None
                conditions.append(await self.leaf(component, Criterion(name, (parameter.base,), component, None, None, [part])))
            alternatives.append(all_of(conditions))
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}

    def composite_entries(self, parameter: SearchParameter, parts: list[str], name: str) -> Filter:
        match: Filter = {"p": parameter.code}
        extra: list[Filter] = []
        for position, (component, part) in enumerate(zip(parameter.components, parts, strict=True)):
            kind = component.type
            if kind == "token":
                key, prefix = token_key(part, name)
                match[f"k{position}"] = {"$regex": "^" + regex_literal(key)} if prefix else key
            elif kind == "string":
                match[f"k{position}"] = {"$regex": "^" + regex_literal(":" + normalize(unescape(part)))}
            elif kind in ("reference", "uri"):
                match[f"k{position}"] = ">" + unescape(part)
            elif kind == "quantity":
                extra.append(quantity_condition(part, name, str(position)))
            elif kind == "date":
                prefix, text = split_prefix(unescape(part), name)
                extra.append(date_condition(prefix, text, name, f"l{position}", f"h{position}"))
            else:
                prefix, text = split_prefix(unescape(part), name)
                extra.append(number_condition(prefix, text, name, f"l{position}", f"h{position}"))
        element = all_of([match, *extra])
        return {"s.c": {"$elemMatch": element}}

    # --- special parameters -----------------------------------------------------------------

    async def special(self, criterion: Criterion, types: tuple[str, ...]) -> Filter:
        name, modifier, special = criterion.name, criterion.modifier, criterion.special
        values = [unescape(v) for v in criterion.values if v != ""]
        if modifier == "missing":
            # every resource has an id and a lastUpdated
            return {} if criterion.values == ["false"] else {"_id": {"$in": []}}
        if not values:
            raise error(400, "value", f"{name} has no value", name)
        if special == "_id":
            condition = {"_id": {"$in": [f"{t}/{v}" for t in types for v in values]}}
            return {"$nor": [condition]} if modifier == "not" else condition
        if special == "_lastUpdated":
            conditions = []
            for value in values:
                prefix, text = split_prefix(value, name)
                conditions.append(date_condition(prefix, text, name, "ts", "ts"))
            return conditions[0] if len(conditions) == 1 else {"$or": conditions}
        if special in ("_text", "_content"):
            search = " ".join(f'"{v}"' if " " in v else v for v in values)
            condition: Filter = {"$text": {"$search": search}}
            if special == "_text":
                words = [w for v in values for w in v.split()]
                return {"$and": [condition, {"$or": [{"s.tx": {"$regex": regex_literal(w), "$options": "i"}} for w in words]}]}
            return condition
        if special == "_list":
            return await self.in_list(values, name)
        raise error(400, "not-supported", f"{name} is not supported", name)

    async def in_list(self, values: list[str], name: str) -> Filter:
        keys = []
        for value in values:
            if value.startswith("$"):
                raise error(400, "not-supported", f"{name}: functional lists ({value}) are not supported", name)
            keys.append(f"List/{value}")
        members: list[str] = []
        for doc in await self.db.by_ids(keys):
            body = jsonio.loads(doc["body"]) if doc.get("body") else {}
            for entry in body.get("entry", []) or []:
                reference = ((entry or {}).get("item") or {}).get("reference")
                if isinstance(reference, str):
                    members.extend(f for f in reference_literal(reference) if f.count("/") == 1)
        return {"_id": {"$in": sorted(set(members))}}

    # --- chains -----------------------------------------------------------------------------

    async def matching_ids(self, types: tuple[str, ...], condition: Filter, name: str) -> list[str]:
        ids = await self.db.ids(all_of([type_filter(types), condition]), MAX_IDS + 1, self.session)
        if len(ids) > MAX_IDS:
            raise error(400, "too-costly", f"{name}: the chained search matches more than {MAX_IDS} resources; narrow it", name)
        return ids

    async def chained(self, criterion: Criterion) -> Filter:
        """Resolve a chain from its end: the ids matching the last link, then each link back."""
        ids = await self.matching_ids(criterion.types, await self.leaf_on_types(criterion, criterion.types), criterion.name)
        links = criterion.chain
        for position in range(len(links) - 1, -1, -1):
            link = links[position]
            keys = [f"{link.code}>{i}" for i in ids]
            condition: Filter = {"s.k": {"$in": keys}}
            if position == 0:
                return condition
            sources = links[position - 1].targets
            ids = await self.matching_ids(sources, condition, criterion.name)
        raise AssertionError("a chain has at least one link")

    async def reverse_chained(self, criterion: Criterion) -> Filter:
        """`_has`: resources referenced (through each link's parameter) by the matches."""
        condition = await self.leaf_on_types(criterion, criterion.types)
        for position in range(len(criterion.has) - 1, -1, -1):
            link = criterion.has[position]
            referenced = link.referenced
            rows = await self.db.keys(all_of([type_filter((link.type,)), condition]), MAX_IDS + 1)
            if len(rows) > MAX_IDS:
                raise error(400, "too-costly", f"{criterion.name}: more than {MAX_IDS} resources match; narrow it", criterion.name)
            prefix = f"{link.parameter.code}>{referenced}/"
            ids = sorted({k[len(link.parameter.code) + 1 :] for row in rows for k in row if k.startswith(prefix)})
            condition = {"_id": {"$in": ids}}
        return condition


_KILOMETRES = {"km": 1.0, "m": 0.001, "[mi_i]": 1.609344, "mi": 1.609344}
EARTH_RADIUS_KM = 6378.1


def near(value: str, name: str) -> Filter:
    """`near=latitude|longitude[|distance[|units]]` (Location): within the distance (km by
    default, 1 km when none is given) on the sphere."""
    parts = value.split("|")
    if not 2 <= len(parts) <= 4:
        raise error(400, "value", f"{name}: expected latitude|longitude|distance|units", name)
    try:
        latitude, longitude = float(parts[0]), float(parts[1])
        distance = float(parts[2]) if len(parts) > 2 and parts[2] else 1.0
    except ValueError:
        raise error(400, "value", f"{name}: {value!r} is not a number", name) from None
    unit = parts[3] if len(parts) == 4 else "km"
    if unit not in _KILOMETRES or not (-90 <= latitude <= 90 and -180 <= longitude <= 180) or not 0 <= distance < 1e5:
        raise error(400, "value", f"{name}: {value!r} is out of range (units: km, m, [mi_i])", name)
    radians = distance * _KILOMETRES[unit] / EARTH_RADIUS_KM
    return {"s.g": {"$geoWithin": {"$centerSphere": [[longitude, latitude], radians]}}}


_SEPARATORS = {"token": "[|#~!]", "string": "[:=]", "reference": "[>@]", "uri": ">"}


def presence(parameter: SearchParameter) -> Filter:
    """The parameter has a value (`:missing=false`): one of its terms exists."""
    p = parameter.code
    if parameter.type in ("date", "number", "quantity"):
        return {"s.v.p": p}
    if parameter.type == "composite":
        return composite_presence(parameter)
    if parameter.type == "special":
        return {"s.g": {"$exists": True}}
    return anchored(p, _SEPARATORS[parameter.type])


def composite_presence(parameter: SearchParameter) -> Filter:
    """A composite has a value where it stored an entry (pairs below the resource) or, for a
    composite of the resource itself (`Observation?code-value-quantity`, which stores no
    entries: see terms.Plan.root_components), where each component's own parameter has one."""
    stored: Filter = {"s.c.p": parameter.code}
    plan = terms.plan_of(parameter)
    if not plan.root_components:
        return stored
    conditions = []
    for code in plan.root_components:
        component = REGISTRY.get(parameter.base, code)
        assert component is not None
        conditions.append(presence(component))
    on_resource = all_of(conditions)
    return {"$or": [stored, on_resource]} if plan.components else on_resource


def type_filter(types: tuple[str, ...], live: bool = False) -> Filter:
    """The resource types, and "not deleted" unless the rest of the filter implies it.

    A deleted resource keeps no search terms, so a filter that requires a term can only
    match live resources; leaving `deleted` out then lets MongoDB count from the index
    alone instead of fetching every matching document.
    """
    condition: Filter = {"t": types[0]} if len(types) == 1 else {"t": {"$in": list(types)}}
    if not live:
        condition["deleted"] = False
    return condition


_TERMS = ("s.k", "s.v", "s.c", "s.g")


def requires_terms(condition: Filter) -> bool:
    """Whether every document matching `condition` has a search term (so is not deleted)."""
    for key, value in condition.items():
        if key == "$and" and any(requires_terms(c) for c in value):
            return True
        if key == "$or" and value and all(requires_terms(c) for c in value):
            return True
        if key in _TERMS:
            if isinstance(value, str):
                return True
            if isinstance(value, dict) and set(value) <= {"$in", "$regex", "$elemMatch", "$geoWithin"} and value.get("$in") != []:
                return True
    return False


def uri_ancestors(value: str) -> list[str]:
    """`http://a/b/c` and every shorter path of it down to the host, each with and without
    a trailing `/` (uri :above): the stored URLs that `:below` would find `value` from."""
    path = value.removesuffix("/")
    found = [path, path + "/"]
    head, sep, _ = path.rpartition("/")
    while sep and head and not head.endswith(("/", ":")):
        found += [head, head + "/"]
        head, sep, _ = head.rpartition("/")
    return found
