"""The FHIR RESTful interactions on single resources: create, read, vread, update, patch,
delete, and history (http://hl7.org/fhir/R4/http.html).

Each write runs in one MongoDB transaction that reads the current version, checks the
preconditions (If-Match), and writes the new version with compare-and-set; concurrent
writers to the same resource are serialized by MongoDB's write-conflict detection and the
loser re-runs from its read, so versions have no gaps and no write is lost. The `*_in`
variants do the same work inside a caller's transaction (transaction bundles), and read,
vread and history take the session of one to see its writes (a transaction's GETs).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pymongo.asynchronous.client_session import AsyncClientSession

from server.fhir import jsonio
from server.fhir.definitions import resource_types
from server.fhir.outcome import FhirError, Issue, error, not_found
from server.fhir.validation import validate
from server.store.fhir import FhirStore, HistoryScope, NewVersion, StoredResource, VersionConflict

ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_CONFLICT_RETRIES = 100
Resource = dict[str, Any]
T = TypeVar("T")
# An If-Match precondition: a version, "*" (any current version, RFC 7232), or none
IfMatch = int | Literal["*"] | None


@dataclass
class Hooks:
    """Extension points where other services join the write path.

    - `incoming`: async transforms run on every resource before it is validated (create,
      update, patch result, transaction entry); they may change it in place (terminology
      normalization adds mapped codings). A transaction passes all its resources in one
      call, so that a transform can look up what they need at once.
    - `index`: computes the search terms of a stamped resource (the search service).
    - `after_write`: runs after each stored version (its `body` is the stored JSON, None
      for a delete), inside the write's transaction when it has one. A create is one
      document insert and has none (its session is None), unless its body is chunked.
    """

    incoming: list[Callable[..., Awaitable[None]]] = field(default_factory=list)
    index: Callable[[Resource], dict[str, Any]] | None = None
    after_write: list[Callable[[AsyncClientSession | None, NewVersion], Awaitable[None]]] = field(
        default_factory=list
    )


HOOKS = Hooks()


async def incoming(*resources: Resource) -> None:
    for transform in HOOKS.incoming:
        await transform(*resources)


async def persist(
    session: AsyncClientSession, db: FhirStore, new: NewVersion, expected_version: int | None
) -> None:
    """Store one version (compare-and-set) and run the after-write hooks."""
    await db.write(session, new, expected_version)
    await after_write(session, new)


async def after_write(session: AsyncClientSession | None, new: NewVersion) -> None:
    for hook in HOOKS.after_write:
        await hook(session, new)


@dataclass(slots=True)
class Written:
    """The outcome of a write: its HTTP status and the version now current."""

    status: int
    type: str
    id: str
    version: int
    last_updated: datetime
    body: bytes | None

    @classmethod
    def of(cls, status: int, new: NewVersion) -> Written:
        return cls(status, new.type, new.id, new.version, new.last_updated, new.body)


def check_type(type_: str) -> None:
    if type_ not in resource_types():
        raise error(404, "not-supported", f"{type_!r} is not a FHIR R4 resource type")


def check_id(id_: str) -> None:
    if not ID.fullmatch(id_):
        raise error(400, "value", f"{id_!r} is not a valid resource id ([A-Za-z0-9-.]{{1,64}})")


def check_version_id(version: str) -> int:
    if not (version.isascii() and version.isdigit()) or len(version) > 18:
        raise error(404, "not-found", f"Version {version!r} is not known")
    return int(version)


def parse_etag(value: str | None, header: str) -> IfMatch:
    """The version in an ETag-style precondition (`W/"3"`, `"3"` or `3`), or `*`."""
    if value is None:
        return None
    if value.strip() == "*":
        return "*"
    tag = value.strip().removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdigit()) or len(tag) > 18:
        raise error(400, "value", f"{header}: {value!r} is not a version ETag like W/\"1\"")
    return int(tag)


def now() -> datetime:
    """The current instant at millisecond precision (what MongoDB stores exactly)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def next_timestamp(previous: StoredResource | None) -> datetime:
    """Now, but strictly after the previous version, so a resource's history is ordered."""
    moment = now()
    if previous is not None and moment <= previous.last_updated:
        moment = previous.last_updated + timedelta(milliseconds=1)
    return moment


def instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def new_id() -> str:
    return str(uuid.uuid4())


def stamp(resource: Resource, id_: str, version: int, moment: datetime) -> Resource:
    """The resource as stored: the sent JSON, element order kept, with the server's id and
    meta where the client had them, else right after resourceType. A meta that is not an
    object is left for validation to reject."""
    meta = resource.get("meta", {})
    if isinstance(meta, dict):
        meta = {
            "versionId": str(version),
            "lastUpdated": instant(moment),
            **{k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")},
        }
    stamped: Resource = {}
    for key, value in resource.items():
        stamped[key] = id_ if key == "id" else meta if key == "meta" else value
        if key == "resourceType":
            stamped.setdefault("id", id_)
            stamped.setdefault("meta", meta)
    return stamped


def check_resource_type(resource: Resource, type_: str) -> None:
    if resource.get("resourceType") != type_:
        raise error(
            400,
            "invalid",
            f"The resourceType {resource.get('resourceType')!r} does not match the URL ({type_})",
            "resourceType",
        )


def serialize(resource: Resource) -> bytes:
    return jsonio.dumps(resource)


Defer = Callable[[bytes, Resource], None]


def prepare(
    resource: Resource, id_: str, version: int, moment: datetime, method: str, defer: Defer | None = None
) -> NewVersion:
    """Stamp, validate and serialize one incoming resource into the version to store.

    With `defer`, the fhir.resources check, if due, is handed to it (body, resource)
    instead of run here: the caller must run it before the write (library_checks.py).
    """
    stamped = stamp(resource, id_, version, moment)
    due = validate(stamped, library=defer is None)
    search = HOOKS.index(stamped) if HOOKS.index is not None else {}
    new = NewVersion(stamped["resourceType"], id_, version, moment, method, serialize(stamped), search)
    if due and defer is not None:
        defer(new.body, stamped)
    return new


def restamp(new: NewVersion, resource: Resource, version: int, moment: datetime) -> NewVersion:
    """The same validated content under another version number (after a lost race)."""
    if version == new.version and moment == new.last_updated:
        return new
    body = jsonio.dumps(stamp(resource, new.id, version, moment))
    return NewVersion(new.type, new.id, version, moment, new.method, body, new.search)


async def retry_on_conflict(attempt: Callable[[], Awaitable[T]]) -> T:
    """Re-run a read-check-write from the read when another writer got there first."""
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            return await attempt()
        except VersionConflict:
            continue
    raise error(409, "conflict", "The resource is being changed by others; try again")


# --- create -------------------------------------------------------------------------------


def prepare_create(type_: str, resource: Resource, id_: str | None = None, defer: Defer | None = None) -> NewVersion:
    """Check and build the first version of a new resource (the client's id is ignored)."""
    check_type(type_)
    check_resource_type(resource, type_)
    return prepare(resource, id_ or new_id(), 1, now(), "POST", defer)


async def create(db: FhirStore, type_: str, resource: Resource) -> Written:
    check_type(type_)
    await incoming(resource)
    new = prepare_create(type_, resource)
    await db.create(new, after_write)
    return Written.of(201, new)


# --- read ---------------------------------------------------------------------------------


async def read(db: FhirStore, type_: str, id_: str, session: AsyncClientSession | None = None) -> StoredResource:
    """The current version (with `session`, as that session's transaction sees it)."""
    check_type(type_)
    check_id(id_)
    current = await db.current(type_, id_, session)
    if current is None:
        raise not_found(type_, id_)
    if current.deleted:
        raise gone(current)
    return current


def gone(resource: StoredResource) -> FhirError:
    return FhirError(
        410,
        [Issue("deleted", f"{resource.type}/{resource.id} was deleted")],
        {"ETag": f'W/"{resource.version}"'},
    )


async def vread(
    db: FhirStore, type_: str, id_: str, version: str, session: AsyncClientSession | None = None
) -> StoredResource:
    check_type(type_)
    check_id(id_)
    stored = await db.version(type_, id_, check_version_id(version), session)
    if stored is None:
        raise error(404, "not-found", f"{type_}/{id_} has no version {version}")
    if stored.deleted:
        raise gone(stored)
    return stored


# --- update -------------------------------------------------------------------------------


def check_update_body(type_: str, id_: str, resource: Resource) -> None:
    check_type(type_)
    check_id(id_)
    check_resource_type(resource, type_)
    if "id" not in resource:
        raise error(400, "required", "The resource has no id; an update must carry the id of its URL", f"{type_}.id")
    if resource["id"] != id_:
        raise error(
            400, "invalid", f"The resource id {resource['id']!r} does not match the URL id {id_!r}", f"{type_}.id"
        )


def check_if_match(current: StoredResource | None, if_match: IfMatch) -> None:
    if if_match is None:
        return
    if current is None or current.deleted:
        raise error(412, "conflict", "If-Match given but the resource does not exist")
    if if_match != "*" and current.version != if_match:
        raise error(
            412, "conflict", f"If-Match W/\"{if_match}\" does not match the current version {current.version}"
        )


async def update_in(
    session: AsyncClientSession,
    db: FhirStore,
    validated: NewVersion,
    resource: Resource,
    if_match: IfMatch,
) -> Written:
    """Write a validated resource as the next version of `validated.type/id`."""
    current = await db.current(validated.type, validated.id, session)
    check_if_match(current, if_match)
    version = current.version + 1 if current else 1
    new = restamp(validated, resource, version, next_timestamp(current))
    await persist(session, db, new, current.version if current else None)
    created = current is None or current.deleted
    return Written.of(201 if created else 200, new)


async def update(
    db: FhirStore, type_: str, id_: str, resource: Resource, if_match: IfMatch
) -> Written:
    check_update_body(type_, id_, resource)
    await incoming(resource)
    validated = prepare(resource, id_, 1, now(), "PUT")
    return await retry_on_conflict(
        lambda: db.store.transaction(
            lambda session: update_in(session, db, validated, resource, if_match)
        )
    )


# --- patch --------------------------------------------------------------------------------


async def patch_in(
    session: AsyncClientSession,
    db: FhirStore,
    type_: str,
    id_: str,
    apply: Callable[[Resource], Resource],
    if_match: IfMatch,
) -> Written:
    current = await db.current(type_, id_, session)
    if current is None:
        raise not_found(type_, id_)
    if current.deleted:
        raise gone(current)
    check_if_match(current, if_match)
    assert current.body is not None
    patched = apply(jsonio.loads(current.body))
    if not isinstance(patched, dict):
        # a JSON Patch may replace the whole document (`"path": ""`) with an array or a
        # scalar: not a resource, so a 400 rather than an AttributeError below
        raise error(400, "invalid", "The patched document is not a resource (a JSON object)")
    if patched.get("resourceType") != type_ or patched.get("id") != id_:
        raise error(400, "invalid", "A patch may not change the resourceType or id")
    await incoming(patched)
    new = prepare(patched, id_, current.version + 1, next_timestamp(current), "PATCH")
    await persist(session, db, new, current.version)
    return Written.of(200, new)


async def patch(
    db: FhirStore,
    type_: str,
    id_: str,
    apply: Callable[[Resource], Resource],
    if_match: IfMatch,
) -> Written:
    check_type(type_)
    check_id(id_)
    return await retry_on_conflict(
        lambda: db.store.transaction(
            lambda session: patch_in(session, db, type_, id_, apply, if_match)
        )
    )


# --- delete -------------------------------------------------------------------------------


async def delete_in(
    session: AsyncClientSession, db: FhirStore, type_: str, id_: str, if_match: IfMatch
) -> Written | None:
    """Delete logically (a tombstone version); None when there was nothing to delete."""
    current = await db.current(type_, id_, session)
    check_if_match(current, if_match)
    if current is None or current.deleted:
        return None
    new = NewVersion(type_, id_, current.version + 1, next_timestamp(current), "DELETE", None)
    await persist(session, db, new, current.version)
    return Written.of(204, new)


async def delete(db: FhirStore, type_: str, id_: str, if_match: IfMatch) -> Written | None:
    check_type(type_)
    check_id(id_)

    return await retry_on_conflict(
        lambda: db.store.transaction(lambda session: delete_in(session, db, type_, id_, if_match))
    )


# --- history ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: list[StoredResource]
    total: int | None
    has_more: bool


async def history(
    db: FhirStore,
    scope: HistoryScope,
    after: tuple[datetime, str] | None,
    count: int,
    with_total: bool,
    session: AsyncClientSession | None = None,
) -> HistoryPage:
    if scope.type is not None:
        check_type(scope.type)
    if scope.id is not None:
        check_id(scope.id)
    rows = await db.history_page(scope, after, count + 1, session)
    total = await db.history_count(scope, session) if with_total else None
    if scope.id is not None and not rows and after is None and not total:
        assert scope.type is not None
        if await db.current(scope.type, scope.id, session) is None:
            raise not_found(scope.type, scope.id)
    return HistoryPage(rows[:count], total, len(rows) > count)
