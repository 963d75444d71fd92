"""Batch and transaction Bundles posted to the base (http.html#transaction).

A transaction is atomic: every entry runs in one MongoDB transaction, so any failure
leaves nothing behind and is answered with a single OperationOutcome. It follows the
spec's processing order (DELETE, POST, PUT/PATCH, then GET), gives every POSTed
`urn:uuid:` fullUrl its new id, and rewrites the references that used it before anything
is validated or stored. Validation happens before the database transaction opens, so the
transaction is short. A conditional DELETE deletes every match, as alone (conditionalDelete
= multiple, up to the same bound), each of them counting as a target of the entry for the
rule that no two entries touch one resource, and answers one 204. GET (and HEAD) entries run last inside the database transaction,
dispatched in process with its session: they see its uncommitted writes, a GET that fails
(4xx or 5xx; a 304 is not a failure) fails the transaction, and their answers are those of
the attempt that commits (MongoDB re-runs the whole body after a transient error, one
raised while a GET runs included: the in-process dispatch raises database errors on to
the transaction instead of answering them 500).

A batch is a list of independent requests: each entry is dispatched through the server's
own HTTP routes (in process), so it behaves exactly like the same request sent alone, and
fails alone.

The Bundle itself is validated as a resource too (`envelope_issues`), without its entries'
resources, which are validated entry by entry: a problem with Bundle's own elements
refuses the whole Bundle, one with an entry's other elements (fullUrl, request, ...) fails
that entry, which in a transaction fails it all.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from server.fhir import interactions, jsonio, r4validator
from server.fhir.bundle import Bundle, Entry
from server.fhir.http import parse_http_date
from server.fhir.interactions import Written, check_id, check_type, new_id
from server.fhir.library_checks import LibraryChecks
from server.fhir.outcome import FhirError, Issue, error, issues_of, outcome_json
from server.fhir.patch import Patcher, fhirpath_patch, json_patch
from server.fhir.search import conditional as search_conditional
from server.store.database import TransactionTooLarge
from server.store.fhir import FhirStore, NewVersion

# (method, relative url with query, headers, body, the session of the transaction whose
# GET entry it is, else None) -> (status, headers, body)
Dispatch = Callable[
    [str, str, dict[str, str], bytes | None, AsyncClientSession | None], Awaitable[tuple[int, dict[str, str], bytes]]
]

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


@dataclass
class Request:
    """One bundle entry's request, checked and with its target resolved."""

    index: int
    method: str
    url: str  # relative to the base, query included
    full_url: str | None
    resource: dict[str, Any] | None
    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_none_exist: str | None = None
    type: str | None = None
    id: str | None = None
    criteria: str | None = None  # the search of a conditional PUT/DELETE/PATCH url
    matched: bool = False  # an ifNoneExist POST that matched an existing resource
    matches: list[str] = field(default_factory=list)  # the ids a conditional DELETE matched

    @property
    def path(self) -> str:
        return self.url.split("?", 1)[0]

    @property
    def targets(self) -> list[str]:
        """The ids of the resources this write touches: every match of a conditional
        DELETE (conditionalDelete = multiple), else its one id if it has one."""
        if self.method == "DELETE" and self.criteria is not None:
            return self.matches
        return [self.id] if self.id is not None else []


def _relative(url: str, base: str) -> str:
    if url.startswith(base + "/"):
        return url[len(base) + 1 :]
    return url.lstrip("/")


def _string(element: dict[str, Any], name: str, where: str) -> str | None:
    """An optional string element of an entry: anything else is a 400 naming it, not a
    number reaching code that strips or encodes header values."""
    value = element.get(name)
    if value is not None and not isinstance(value, str):
        raise error(400, "structure", f"{where}.{name} must be a string", f"{where}.{name}")
    return value


def check_full_urls(entries: list[Any]) -> None:
    """bdl-7: a fullUrl is unique in a batch or transaction (only other versions of one
    resource may share it, which these bundles cannot carry); two POSTs under one
    urn:uuid would otherwise make two resources for the references to it."""
    first: dict[str, int] = {}
    for index, entry in enumerate(entries):
        full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if not isinstance(full_url, str):
            continue
        if full_url in first:
            raise error(
                400, "invariant",
                f"Bundle.entry[{index}].fullUrl {full_url} is also the fullUrl of Bundle.entry[{first[full_url]}] (bdl-7: fullUrl must be unique)",
                f"Bundle.entry[{index}].fullUrl",
            )
        first[full_url] = index


def bundle_entries(bundle: dict[str, Any]) -> list[Any]:
    """Bundle.entry, checked as a whole: an array, with unique fullUrls."""
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise error(400, "structure", "Bundle.entry must be an array", "Bundle.entry")
    check_full_urls(entries)
    return entries


# What stands for each entry.resource while the envelope is validated: a resource with no
# required element, so the envelope's issues are the Bundle's and the entries' own.
_PLACEHOLDER: dict[str, Any] = {"resourceType": "Parameters"}
_ENTRY = re.compile(r"Bundle\.entry\[(\d+)\]")


@dataclass
class EnvelopeIssues:
    """The R4 validator's issues with a Bundle's envelope: with the Bundle's own elements,
    and by entry index with the elements of each entry other than its resource."""

    bundle: list[Issue]
    entries: dict[int, list[Issue]]

    def all(self) -> list[Issue]:
        return self.bundle + [issue for index in sorted(self.entries) for issue in self.entries[index]]


def envelope_issues(bundle: dict[str, Any]) -> EnvelopeIssues:
    """Validate the Bundle as R4 defines it, each entry.resource replaced by a placeholder:
    the resources are validated per entry (a batch's bad resource fails its entry alone,
    and is not reported twice). The copy has the Bundle's shape, so the issues' expressions
    are those of the Bundle sent. An empty `entry` array, which R4 JSON forbids, is taken
    as no entries, as before (an empty batch harms no one)."""
    envelope = dict(bundle)
    entries = bundle.get("entry")
    if entries == []:
        del envelope["entry"]
    elif isinstance(entries, list):
        envelope["entry"] = [
            {**item, "resource": _PLACEHOLDER} if isinstance(item, dict) and "resource" in item else item
            for item in entries
        ]
    found = EnvelopeIssues([], {})
    for issue in r4validator.validate(envelope).issues:
        match = next((m for m in map(_ENTRY.match, issue.expression) if m is not None), None)
        if match is None:
            found.bundle.append(issue)
        else:
            found.entries.setdefault(int(match[1]), []).append(issue)
    return found


def parse_entry(index: int, entry: Any, base: str) -> Request:
    """One entry's request, checked (400 naming the element at fault)."""
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
        raise error(400, "required", f"{where} has no request", f"{where}.request")
    request = entry["request"]
    method = _string(request, "method", f"{where}.request")
    url = _string(request, "url", f"{where}.request")
    if method not in ORDER:
        raise error(400, "value", f"{where}.request.method {method!r} is not supported", f"{where}.request.method")
    if not isinstance(url, str) or not url:
        raise error(400, "required", f"{where}.request.url is missing", f"{where}.request.url")
    resource = entry.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise error(400, "structure", f"{where}.resource must be a resource", f"{where}.resource")
    if method in ("POST", "PUT", "PATCH") and resource is None:
        raise error(400, "required", f"{where} ({method}) has no resource", f"{where}.resource")
    return Request(
        index, method, _relative(url, base), _string(entry, "fullUrl", where), resource,
        *(_string(request, name, f"{where}.request") for name in ("ifMatch", "ifNoneMatch", "ifModifiedSince", "ifNoneExist")),
    )


def _with_entry(exc: FhirError, index: int, element: str | None = None) -> FhirError:
    """Point an entry's errors at the entry (Bundle.entry[i].resource...), or all at one
    `element` of it (a GET's at its request.url, whose expressions name query parameters,
    not elements of a resource)."""
    issues = []
    for issue in exc.issues:
        if element is not None:
            expressions: tuple[str, ...] = (f"Bundle.entry[{index}].{element}",)
        else:
            expressions = tuple(
                f"Bundle.entry[{index}].resource" + e[e.index(".") :] if "." in e else f"Bundle.entry[{index}]"
                for e in issue.expression
            ) or (f"Bundle.entry[{index}]",)
        issues.append(Issue(issue.code, f"Bundle.entry[{index}]: {issue.diagnostics}", issue.severity, expressions))
    return FhirError(exc.status, issues, exc.headers)


# --- transaction --------------------------------------------------------------------------


def _resolve_targets(requests: list[Request]) -> dict[str, str]:
    """Give each write its target, and map bundle-local fullUrls to `Type/id`."""
    identities: dict[str, str] = {}
    for request in requests:
        if request.method == "GET" or request.method == "HEAD":
            continue
        parts = request.path.split("/")
        if "?" in request.url and request.method in ("PUT", "DELETE", "PATCH") and len(parts) == 1:
            request.type, request.criteria = parts[0], request.url.split("?", 1)[1]
            check_type(request.type)
            continue  # its target is found by search_conditional.resolve_transaction
        if request.method == "POST":
            if len(parts) != 1:
                raise error(400, "invalid", f"Bundle.entry[{request.index}]: POST url must be a resource type")
            request.type, request.id = parts[0], new_id()
        else:
            if len(parts) != 2:
                raise error(400, "invalid", f"Bundle.entry[{request.index}]: {request.method} url must be Type/id")
            request.type, request.id = parts
            check_id(request.id)
        check_type(request.type)
        if request.full_url:
            identities[request.full_url] = f"{request.type}/{request.id}"
    return identities


def check_overlap(requests: list[Request]) -> None:
    """Refuse a transaction whose writes share a target (http.html#trules), the resolved
    targets of conditional entries included (each match of a conditional DELETE), so it
    runs only once those are known."""
    seen: dict[str, int] = {}
    for request in requests:
        if request.method in ("GET", "HEAD"):
            continue
        for id_ in dict.fromkeys(request.targets):
            key = f"{request.type}/{id_}"
            if key in seen:
                raise error(
                    400, "invalid",
                    f"Bundle.entry[{request.index}]: {key} is also the target of Bundle.entry[{seen[key]}]; "
                    "a transaction may touch a resource only once",
                    f"Bundle.entry[{request.index}].request.url",
                )
            seen[key] = request.index


# an `<a href>` or `<img src>` attribute in the narrative's XHTML
_LINK_ATTRIBUTE = re.compile(r"""(\s(?:href|src)\s*=\s*)(["'])(.*?)\2""")


def _rewritten(key: str, value: str, identities: dict[str, str]) -> str:
    if key == "div":
        return _LINK_ATTRIBUTE.sub(lambda m: f"{m[1]}{m[2]}{identities.get(m[3], m[3])}{m[2]}", value)
    if value in identities:
        return identities[value]
    base, _, fragment = value.partition("#")
    if key == "reference" and fragment and base in identities:
        return f"{identities[base]}#{fragment}"
    return value


def rewrite_links(node: Any, identities: dict[str, str]) -> None:
    """Replace bundle-local fullUrls with the resources' new `Type/id` wherever they are
    links (http.html#trules): any string that is exactly one (references, and uri, url,
    canonical, oid and uuid values, which are whole strings), a reference to a fragment
    of one, and `<a href>` / `<img src>` values in the narrative."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                node[key] = _rewritten(key, value, identities)
            else:
                rewrite_links(value, identities)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, str):
                node[index] = identities.get(item, item)
            else:
                rewrite_links(item, identities)


def binary_content(resource: dict[str, Any]) -> tuple[str, bytes]:
    """A Binary entry's contentType and decoded data (400 naming the element when malformed)."""
    content_type, data = resource.get("contentType"), resource.get("data", "")
    if not isinstance(content_type, str):
        raise error(400, "required", "A Binary needs a contentType string", "Binary.contentType")
    if not isinstance(data, str):
        raise error(400, "structure", "Binary.data must be a base64 string", "Binary.data")
    try:
        return content_type, base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise error(400, "invalid", "Binary.data is not base64", "Binary.data") from None


def binary_patch(resource: dict[str, Any]) -> Patcher:
    """A PATCH entry's body: a Binary holding a JSON Patch, or a FHIRPath Patch Parameters."""
    if resource.get("resourceType") == "Parameters":
        return fhirpath_patch(resource)
    if resource.get("resourceType") == "Binary":
        content_type, data = binary_content(resource)
        if content_type.split(";")[0].strip() != "application/json-patch+json":
            raise error(400, "not-supported", "A Binary patch must have contentType application/json-patch+json", "Binary.contentType")
        return json_patch(jsonio.parse(data))
    raise error(400, "invalid", "A PATCH entry's resource must be a Binary (JSON Patch) or Parameters")


@dataclass
class _Prepared:
    request: Request
    new: NewVersion | None = None
    patcher: Patcher | None = None
    if_match: interactions.IfMatch = None


def _resource_written(request: Request) -> dict[str, Any] | None:
    """The resource a POST or PUT entry writes (None for other entries and for an
    ifNoneExist that matched)."""
    if request.method in ("POST", "PUT") and not request.matched:
        return request.resource
    return None


async def _prepare(request: Request, checks: LibraryChecks) -> _Prepared:
    """Check and build an entry's write; its resource has been through `incoming`."""
    prepared = _Prepared(request, if_match=interactions.parse_etag(request.if_match, "ifMatch"))

    def defer(body: bytes, resource: dict[str, Any]) -> None:
        checks.add(request.index, body, resource)

    if request.matched or request.method == "DELETE":
        return prepared  # nothing to prepare: an ifNoneExist match, a DELETE
    assert request.type is not None and request.id is not None
    if request.method == "POST":
        assert request.resource is not None
        prepared.new = interactions.prepare_create(request.type, request.resource, request.id, defer)
    elif request.method == "PUT":
        assert request.resource is not None
        interactions.check_update_body(request.type, request.id, request.resource)
        prepared.new = interactions.prepare(request.resource, request.id, 1, interactions.now(), "PUT", defer)
    elif request.method == "PATCH":
        assert request.resource is not None
        prepared.patcher = binary_patch(request.resource)
    return prepared


async def transaction(
    db: FhirStore, bundle: dict[str, Any], base: str, dispatch: Dispatch, representation: bool
) -> bytes:
    requests = [parse_entry(index, entry, base) for index, entry in enumerate(bundle_entries(bundle))]
    envelope = envelope_issues(bundle).all()
    if envelope:
        raise FhirError(400, envelope)
    identities = _resolve_targets(requests)
    await search_conditional.resolve_transaction(db, base, requests, identities)
    check_overlap(requests)
    prepared: list[_Prepared] = []
    checks = LibraryChecks()
    for request in requests:
        if request.resource is not None and identities:
            rewrite_links(request.resource, identities)
    await interactions.incoming(*(r for r in map(_resource_written, requests) if r is not None))
    for request in requests:
        if request.method in ("GET", "HEAD"):
            continue
        try:
            prepared.append(await _prepare(request, checks))
        except FhirError as exc:
            raise _with_entry(exc, request.index) from None

    creates = [p for p in prepared if p.request.method == "POST"]
    others = sorted((p for p in prepared if p.request.method != "POST"), key=lambda p: ORDER[p.request.method])
    reads = [r for r in requests if r.method in ("GET", "HEAD")]

    async def body(session: AsyncClientSession) -> tuple[dict[int, Written | None], dict[int, Entry]]:
        results: dict[int, Written | None] = {}
        for item in others:
            if item.request.method != "DELETE":
                continue
            results[item.request.index] = await _write(session, db, item)
        # All creates at once: their ids are new, so they cannot collide with anything.
        plain = [p for p in creates if p.request.if_none_exist is None]
        await db.create_many(session, [p.new for p in plain if p.new is not None])
        for item in plain:
            assert item.new is not None
            await interactions.after_write(session, item.new)
            results[item.request.index] = Written.of(201, item.new)
        for item in creates:
            if item.request.if_none_exist is not None:
                results[item.request.index] = await search_conditional.transaction_create(session, db, base, item.request, item.new)
        for item in others:
            if item.request.method != "DELETE":
                results[item.request.index] = await _write(session, db, item)
        # The writes went to MongoDB while the worker process was still checking the
        # entries with fhir.resources (the longer of the two on one client's bundle); the
        # transaction commits only if it found nothing, else it is aborted.
        for index, issues in await checks.problems():
            raise _with_entry(FhirError(400, issues), index)
        # GETs last, in this attempt: MongoDB re-runs the body after a transient error,
        # and only the answers of the attempt that commits may be returned.
        answered = {request.index: await _read_in(session, request, dispatch) for request in reads}
        return results, answered

    try:
        written, answered = await interactions.retry_on_conflict(lambda: db.store.transaction(body))
    except TransactionTooLarge as exc:
        raise error(
            413, "too-costly",
            f"The transaction ({len(prepared)} writes) is too large for one database "
            f"transaction ({str(exc).split(':', 1)[0]}); nothing was written. Send it as "
            "several smaller transactions, or as a batch if the entries are independent.",
        ) from None
    entries = [
        answered[r.index] if r.index in answered else _write_entry(r, written.get(r.index), base, representation)
        for r in requests
    ]
    return Bundle("transaction-response", entries).to_bytes()


async def _read_in(session: AsyncClientSession, request: Request, dispatch: Dispatch) -> Entry:
    """A GET or HEAD entry, run in the transaction after its writes; its failure (>= 400)
    is the transaction's, pointed at the entry's request.url."""
    status, entry = await _dispatched(request, dispatch, session=session)
    if status >= 400:
        issues = issues_of(entry.response.get("outcome"), f"{request.method} {request.url} answered {status}")
        raise _with_entry(FhirError(status, issues), request.index, "request.url")
    return entry


async def _write(session: AsyncClientSession, db: FhirStore, item: _Prepared) -> Written | None:
    """One DELETE, PUT or PATCH entry; its errors name the entry."""
    try:
        return await _write_one(session, db, item)
    except FhirError as exc:
        raise _with_entry(exc, item.request.index) from None


async def _write_one(session: AsyncClientSession, db: FhirStore, item: _Prepared) -> Written | None:
    request = item.request
    assert request.type is not None
    if request.method == "DELETE":
        deleted = [await interactions.delete_in(session, db, request.type, id_, item.if_match) for id_ in request.targets]
        # one deleted resource answers with its tombstone's version; none or several, a bare 204
        return deleted[0] if len(deleted) == 1 else None
    assert request.id is not None
    if request.method == "PUT":
        assert item.new is not None and request.resource is not None
        return await interactions.update_in(session, db, item.new, request.resource, item.if_match)
    assert item.patcher is not None
    return await interactions.patch_in(session, db, request.type, request.id, item.patcher, item.if_match)


def _write_entry(request: Request, result: Written | None, base: str, representation: bool) -> Entry:
    if result is None:  # a DELETE of something absent
        return Entry(response={"status": status_line(204)})
    response: dict[str, Any] = {"status": status_line(result.status)}
    if result.body is not None:
        response["location"] = f"{result.type}/{result.id}/_history/{result.version}"
    response["etag"] = f'W/"{result.version}"'
    response["lastModified"] = interactions.instant(result.last_updated)
    full_url = f"{base}/{result.type}/{result.id}" if result.body is not None else None
    return Entry(full_url, result.body if representation else None, response=response)


# --- batch --------------------------------------------------------------------------------


def _headers(request: Request) -> dict[str, str]:
    headers = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
    for name, value in (
        ("if-match", request.if_match),
        ("if-none-match", request.if_none_match),
        ("if-modified-since", request.if_modified_since),
        ("if-none-exist", request.if_none_exist),
    ):
        if value is not None:
            headers[name] = value
    return headers


async def _dispatched(
    request: Request, dispatch: Dispatch, representation: bool = True, session: AsyncClientSession | None = None
) -> tuple[int, Entry]:
    """An entry sent through the server's own routes: its status and response entry."""
    body = None
    headers = _headers(request)
    if request.resource is not None:
        if request.method == "PATCH" and request.resource.get("resourceType") == "Binary":
            try:
                headers["content-type"], body = binary_content(request.resource)
            except FhirError as exc:
                raise _with_entry(exc, request.index) from None
        else:
            body = jsonio.dumps(request.resource)
    if not representation:
        headers["prefer"] = "return=minimal"
    status, response_headers, payload = await dispatch(request.method, request.url, headers, body, session)
    response: dict[str, Any] = {"status": status_line(status)}
    for header, field_name in (("location", "location"), ("etag", "etag")):
        if header in response_headers:
            response[field_name] = response_headers[header]
    # lastModified is a FHIR instant, not the HTTP date of the Last-Modified header
    last_modified = parse_http_date(response_headers.get("last-modified", ""))
    if last_modified is not None:
        response["lastModified"] = interactions.instant(last_modified)
    # a HEAD has no body (servers drop it on the wire; in process it is still there)
    resource = payload if payload and request.method != "HEAD" else None
    if status >= 400:
        response["outcome"] = jsonio.loads(payload) if payload else None
        resource = None
    return status, Entry(None, resource, response=response)


async def _batch_entry(
    index: int, entry: Any, base: str, dispatch: Dispatch, representation: bool, envelope: list[Issue]
) -> Entry:
    """One batch entry's response: its own error, a malformed entry's included (its
    `envelope` issues), is reported in it, and the other entries still run
    (http.html#transaction)."""
    try:
        request = parse_entry(index, entry, base)
        if envelope:
            raise FhirError(400, envelope)
        return (await _dispatched(request, dispatch, representation))[1]
    except FhirError as exc:
        return Entry(response={"status": status_line(exc.status), "outcome": outcome_json(exc.issues)})


async def batch(bundle: dict[str, Any], base: str, dispatch: Dispatch, representation: bool) -> bytes:
    entries = bundle_entries(bundle)
    envelope = envelope_issues(bundle)
    if envelope.bundle:
        raise FhirError(400, envelope.bundle)
    responses = [
        await _batch_entry(index, entry, base, dispatch, representation, envelope.entries.get(index, []))
        for index, entry in enumerate(entries)
    ]
    return Bundle("batch-response", responses).to_bytes()


def check_bundle(bundle: dict[str, Any], max_entries: int) -> str:
    """The kind of Bundle posted to the base: 'batch' or 'transaction'. One of more than
    `max_entries` entries is refused before any entry runs: each entry may be a search, so
    without a bound one request could hold a worker for minutes."""
    if bundle.get("resourceType") != "Bundle":
        raise error(400, "invalid", "Only a batch or transaction Bundle can be posted to the base")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise error(400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type")
    entries = bundle.get("entry")
    if isinstance(entries, list) and len(entries) > max_entries:
        raise error(
            413, "too-costly",
            f"The {kind} has {len(entries)} entries; this server takes at most {max_entries} in one Bundle "
            "(setting KUROSHIO_BUNDLE_MAX_ENTRIES). Nothing was done: send several smaller Bundles.",
            "Bundle.entry",
        )
    return str(kind)

