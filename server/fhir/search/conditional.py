"""Conditional create, update and delete (http.html#cond-update, #ccreate, #cdelete).

The match runs inside the write's transaction. When nothing matches and a resource is
about to be created, the normalized match URL is claimed in the store in the same
transaction (`SearchStore.claim`): concurrent conditional creates of the same criteria
then conflict in MongoDB, the losers re-run, find the winner's resource and answer
200 with it, so fifty concurrent `If-None-Exist` creates make exactly one resource.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from pymongo.asynchronous.client_session import AsyncClientSession

from server.fhir import interactions
from server.fhir.interactions import Resource, Written
from server.fhir.outcome import FhirError, Issue, error
from server.fhir.search import query as parsing
from server.fhir.search.compile import Compiler
from server.store.fhir import FhirStore
from server.store.search import SearchStore

MAX_CONDITIONAL_DELETE = 1000


def criteria_items(type_: str, criteria: str) -> list[tuple[str, str]]:
    """The search criteria of a condition, checked (400 when none or invalid).

    Result parameters (`_count`, `_sort`, `_summary`, ...) select nothing, so they are
    dropped: counted as criteria, `DELETE Patient?_count=1` would delete every Patient.
    """
    items = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
    items = [(k, v) for k, v in items if not parsing.is_result_parameter(k)]
    if not items:
        raise error(400, "invalid", f"A conditional {type_} interaction needs search criteria (result parameters like _count are not criteria)")
    parsing.parse((type_,), items, lenient=False, max_count=1)
    return items


def match_key(type_: str, items: list[tuple[str, str]]) -> str:
    """The normalized match URL (parameter order does not matter)."""
    return f"{type_}?{urlencode(sorted(items))}"


async def matches(
    db: FhirStore, base: str, type_: str, items: list[tuple[str, str]], limit: int,
    session: AsyncClientSession | None = None,
) -> list[str]:
    """`Type/id` of up to `limit` current resources matching the criteria."""
    search_db = SearchStore(db.store)
    query = parsing.parse((type_,), items, lenient=False, max_count=1)
    condition = await Compiler(search_db, base, session).query_filter(query)
    return await search_db.ids(condition, limit, session)


def _one(found: list[str], type_: str) -> str | None:
    if len(found) > 1:
        raise error(412, "duplicate", f"The criteria match more than one {type_}; make them more selective")
    return found[0].split("/", 1)[1] if found else None


async def _existing(session: AsyncClientSession, db: FhirStore, type_: str, id_: str) -> Written:
    current = await db.current(type_, id_, session)
    assert current is not None
    return Written(200, type_, id_, current.version, current.last_updated, current.body)


async def create_in(
    session: AsyncClientSession, db: FhirStore, base: str, new: interactions.NewVersion, criteria: str
) -> Written:
    """Inside a transaction: the match if there is one (200), else `new` created (201)."""
    items = criteria_items(new.type, criteria)
    found = _one(await matches(db, base, new.type, items, 2, session), new.type)
    if found is not None:
        return await _existing(session, db, new.type, found)
    await SearchStore(db.store).claim(session, match_key(new.type, items), new.last_updated)
    await interactions.persist(session, db, new, None)
    return Written.of(201, new)


async def create(db: FhirStore, base: str, type_: str, resource: Resource, criteria: str) -> Written:
    """Conditional create (`If-None-Exist`)."""
    interactions.check_type(type_)
    criteria_items(type_, criteria)
    await interactions.incoming(resource)
    new = interactions.prepare_create(type_, resource)
    return await interactions.retry_on_conflict(
        lambda: db.store.transaction(lambda session: create_in(session, db, base, new, criteria))
    )


async def update(
    db: FhirStore, base: str, type_: str, resource: Resource, criteria: str, if_match: interactions.IfMatch
) -> Written:
    """Conditional update (`PUT Type?criteria`): the one match, or a new resource."""
    interactions.check_type(type_)
    interactions.check_resource_type(resource, type_)
    items = criteria_items(type_, criteria)
    body_id = resource.get("id")
    if body_id is not None:
        interactions.check_id(str(body_id))
    await interactions.incoming(resource)
    validated = interactions.prepare(resource, body_id or interactions.new_id(), 1, interactions.now(), "PUT")

    async def body(session: AsyncClientSession) -> Written:
        found = _one(await matches(db, base, type_, items, 2, session), type_)
        if found is not None and body_id is not None and body_id != found:
            raise error(400, "invalid", f"The resource id {body_id!r} is not the id of the matching {type_} ({found})", "id")
        if found is None:
            await SearchStore(db.store).claim(session, match_key(type_, items), interactions.now())
        target = replace(validated, id=found or validated.id, version=0)
        return await interactions.update_in(session, db, target, resource, if_match)

    return await interactions.retry_on_conflict(lambda: db.store.transaction(body))


async def delete_matches(
    db: FhirStore, base: str, type_: str, items: list[tuple[str, str]], session: AsyncClientSession | None = None
) -> list[str]:
    """The ids a conditional delete deletes: every match, up to MAX_CONDITIONAL_DELETE
    (412 too-costly past it, so nothing is deleted)."""
    found = await matches(db, base, type_, items, MAX_CONDITIONAL_DELETE + 1, session)
    if len(found) > MAX_CONDITIONAL_DELETE:
        raise error(412, "too-costly", f"The criteria match more than {MAX_CONDITIONAL_DELETE} resources; nothing was deleted")
    return [key.split("/", 1)[1] for key in found]


async def delete(db: FhirStore, base: str, type_: str, criteria: str) -> int:
    """Conditional delete: every match (up to MAX_CONDITIONAL_DELETE) in one transaction."""
    interactions.check_type(type_)
    items = criteria_items(type_, criteria)

    async def body(session: AsyncClientSession) -> int:
        found = await delete_matches(db, base, type_, items, session)
        for id_ in found:
            await interactions.delete_in(session, db, type_, id_, None)
        return len(found)

    return await interactions.retry_on_conflict(lambda: db.store.transaction(body))


# --- transaction bundles --------------------------------------------------------------------

_CONDITIONAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)\?(.+)")
# a quick look at the serialized resource before walking it
_HAS_CONDITIONAL_REFERENCE = re.compile(rb'"reference":"[A-Z][A-Za-z]+\?')


def _at_entry(exc: FhirError, index: int) -> FhirError:
    issues = [Issue(i.code, f"Bundle.entry[{index}]: {i.diagnostics}", i.severity, i.expression) for i in exc.issues]
    return FhirError(exc.status, issues, exc.headers)


async def resolve_transaction(db: FhirStore, base: str, requests: list[Any], identities: dict[str, str]) -> None:
    """Find the targets of a transaction's conditional entries and references.

    Conditional PUT/PATCH urls (`Patient?identifier=x`) get the id of their one match
    (PUT without a match: the body's id or a new one); a conditional DELETE gets every
    match (`matches`, bounded as the standalone route: conditionalDelete = multiple), and
    its id only when there is exactly one; an `ifNoneExist` POST that
    matches becomes a no-op pointing at the match; references written as searches
    (`"reference": "Patient?identifier=x"`) are replaced by the one match they find.
    fullUrls of resolved entries are mapped so other entries' references follow them.
    """
    for request in requests:
        try:
            await _resolve_entry(db, base, request, identities)
            if request.resource is not None and _HAS_CONDITIONAL_REFERENCE.search(orjson.dumps(request.resource, default=str)):
                await resolve_references(db, base, request.resource)
        except FhirError as exc:
            raise _at_entry(exc, request.index) from None


async def _resolve_entry(db: FhirStore, base: str, request: Any, identities: dict[str, str]) -> None:
    if request.criteria is not None and request.method == "DELETE":
        request.matches = await delete_matches(db, base, request.type, criteria_items(request.type, request.criteria))
        request.id = request.matches[0] if len(request.matches) == 1 else None
    elif request.criteria is not None:
        items = criteria_items(request.type, request.criteria)
        found = _one(await matches(db, base, request.type, items, 2), request.type)
        if request.method == "PUT":
            body_id = (request.resource or {}).get("id")
            if found is not None and body_id is not None and body_id != found:
                raise error(400, "invalid", f"The resource id {body_id!r} is not the id of the match ({found})")
            request.id = found or body_id or interactions.new_id()
            interactions.check_id(request.id)
            if request.resource is not None:
                request.resource["id"] = request.id  # what the update of Type/id expects
        elif found is None:  # PATCH
            raise error(404, "not-found", f"No {request.type} matches {request.criteria}")
        else:
            request.id = found
    elif request.method == "POST" and request.if_none_exist is not None:
        items = criteria_items(request.type, request.if_none_exist)
        found = _one(await matches(db, base, request.type, items, 2), request.type)
        if found is not None:
            request.matched, request.id = True, found
    else:
        return
    if request.full_url and request.id:
        identities[request.full_url] = f"{request.type}/{request.id}"


async def resolve_references(db: FhirStore, base: str, node: Any) -> None:
    """Replace conditional references by the `Type/id` of their single match (else 412)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and (match := _CONDITIONAL_REFERENCE.fullmatch(value)):
                type_, criteria = match.groups()
                interactions.check_type(type_)
                found = await matches(db, base, type_, criteria_items(type_, criteria), 2)
                if len(found) != 1:
                    raise error(412, "not-found" if not found else "duplicate",
                                f"The conditional reference {value} matches {len(found)} resources; it must match one")
                node[key] = found[0]
            else:
                await resolve_references(db, base, value)
    elif isinstance(node, list):
        for item in node:
            await resolve_references(db, base, item)


async def transaction_create(
    session: AsyncClientSession, db: FhirStore, base: str, request: Any, new: interactions.NewVersion | None
) -> Written:
    """An `ifNoneExist` POST inside the transaction: the match, or the new resource."""
    if request.matched:
        return await _existing(session, db, request.type, request.id)
    assert new is not None
    written = await create_in(session, db, base, new, request.if_none_exist)
    if written.status != 201:
        raise error(409, "conflict", f"Bundle.entry[{request.index}]: a matching {request.type} was created concurrently; retry the transaction")
    return written
