"""Custom SearchParameter resources, `$reindex`, and `$meta` at type and system level.

A SearchParameter resource stored on the server (with a URL that is not one of R4's own)
defines a parameter for new writes as soon as it is written in this process (an
after-write hook) and in every other process at their next refresh (`refresh_loop`,
every `REFRESH_SECONDS`), so all processes converge within that bound. Resources stored
before it exist are brought up to date by `$reindex` (system or type level), which
recomputes the search terms of every current resource without creating versions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from server.fhir import jsonio
from server.fhir.operations import OperationCall, OperationResult, meta_operation, operation
from server.fhir.search import terms
from server.fhir.search.fhirpath import check_syntax, evaluate_library
from server.fhir.search.parameters import REGISTRY, SearchParameter, from_resource
from server.store.fhir import NewVersion
from server.store.search import SearchStore

log = logging.getLogger("kuroshio.search")
REFRESH_SECONDS = 5
REINDEX_BATCH = 500
_STANDARD_URLS = frozenset(REGISTRY.by_url)


def usable(resource: dict[str, Any]) -> list[SearchParameter]:
    """The parameters a stored SearchParameter defines ([] if it is R4's own or unusable)."""
    if resource.get("url") in _STANDARD_URLS or resource.get("status") == "retired":
        return []
    try:
        parameters = from_resource(resource)
        for parameter in parameters:
            plan = terms.plan(parameter)
            if plan.extractor.fallback is not None:  # fhirpathpy parses lazily: try it once
                check_syntax(plan.extractor.fallback)
                evaluate_library(plan.extractor.fallback, {"resourceType": parameter.base, "id": "x"})
        return parameters
    except Exception as exc:  # ValueError from our checks, anything from fhirpathpy
        log.info("SearchParameter %s is not used for search: %s", resource.get("id"), exc)
        return []


# id -> (version, its parameters): a refresh reads each version once, so an unusable one is
# logged once per process, not at every refresh
_custom_by_id: dict[str, tuple[int, list[SearchParameter]]] = {}


def _install() -> None:
    REGISTRY.replace_custom(p for _, params in _custom_by_id.values() for p in params)


async def after_write(session: AsyncClientSession | None, new: NewVersion) -> None:
    """A SearchParameter written here takes effect for this process's next writes."""
    if new.type != "SearchParameter":
        return
    if new.body is None:
        _custom_by_id.pop(new.id, None)
    else:
        _custom_by_id[new.id] = new.version, usable(jsonio.loads(new.body))
    _install()


async def refresh(db: SearchStore) -> None:
    """Load every stored custom SearchParameter (other processes may have written some)."""
    found: dict[str, tuple[int, list[SearchParameter]]] = {}
    changed: dict[str, str] = {}  # key -> id, of the versions not parsed here yet
    for key, version in (await db.versions({"t": "SearchParameter", "deleted": False})).items():
        id_ = key.split("/", 1)[1]
        known = _custom_by_id.get(id_)
        if known and known[0] == version:
            found[id_] = known
        else:
            changed[key] = id_
    if changed:  # only new versions are read and parsed
        async for doc in db.bodies({"_id": {"$in": list(changed)}}):
            found[changed[doc["_id"]]] = doc["v"], usable(jsonio.loads(doc["body"]))
    _custom_by_id.clear()
    _custom_by_id.update(found)
    _install()


async def refresh_loop(db: SearchStore) -> None:
    while True:
        try:
            await refresh(db)
        except Exception:  # a failed refresh must not stop the loop; the next one retries
            log.exception("refreshing custom search parameters failed")
        await asyncio.sleep(REFRESH_SECONDS)


# --- $reindex -------------------------------------------------------------------------------


async def reindex(db: SearchStore, type_: str | None) -> int:
    """Recompute the search terms of every current resource (of one type); the count."""
    query: dict[str, Any] = {"deleted": False}
    if type_ is not None:
        query["t"] = type_
    batch: list[tuple[str, int, dict[str, Any]]] = []
    done = 0
    async for doc in db.bodies(query):
        batch.append((doc["_id"], doc["v"], terms.index(jsonio.loads(doc["body"]))))
        if len(batch) >= REINDEX_BATCH:
            await db.set_terms(batch)
            done += len(batch)
            batch = []
    await db.set_terms(batch)
    return done + len(batch)


@operation(
    "reindex", {"system", "type"}, "http://kuroshio.dev/fhir/OperationDefinition/reindex",
    affects_state=True,
)
async def reindex_operation(call: OperationCall) -> OperationResult:
    """Bring stored resources' search terms up to date with the current parameters."""
    db = SearchStore(call.db.store)
    await refresh(db)
    count = await reindex(db, call.type)
    return OperationResult({
        "resourceType": "Parameters",
        "parameter": [{"name": "count", "valueInteger": count}],
    })


# --- $meta at type and system level ---------------------------------------------------------


@operation("meta", {"system", "type", "instance"}, "http://hl7.org/fhir/OperationDefinition/Resource-meta")
async def meta_everywhere(call: OperationCall) -> OperationResult:
    """The tags, profiles and security labels in use (of a type, or on the server)."""
    if call.level == "instance":
        return await meta_operation(call)
    db = SearchStore(call.db.store)
    meta: dict[str, Any] = {}
    found = await db.meta_keys(call.type)
    for key in found:
        code, _, rest = key.partition("|") if key.startswith(("_tag|", "_security|")) else key.partition(">")
        if code in ("_tag", "_security"):
            system, _, value = rest.partition("|")
            if not value:  # `_tag|system|`: a Coding with a system and no code is no tag
                continue
            coding = {"system": system, "code": value} if system else {"code": value}
            meta.setdefault("tag" if code == "_tag" else "security", []).append(coding)
        elif code == "_profile":
            meta.setdefault("profile", []).append(rest)
    return OperationResult({"resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": meta}]})
