"""FHIR R4 REST routes under /fhir: parse the request, call one service, encode the answer.

Every route is declared with `@route(interaction, level, ...)`, which adds it to `ROUTES`
behind the authorization gate and records the interaction for the CapabilityStatement.
Routes hold no business rules and make no database calls.

They are plain Starlette routes, not FastAPI ones: FastAPI's route matching and
dependency solving cost about 400 us a request on this hardware, more than a read's
database round trip, and the FHIR API needs neither its request models nor its
OpenAPI pages (the CapabilityStatement describes it).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlencode

import orjson
from pymongo.asynchronous.client_session import AsyncClientSession
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.config import Settings
from server.fhir import capability, interactions, jsonio, transaction
from server.fhir.bundle import Bundle, Entry
from server.fhir.http import (
    TRANSACTION_SESSION,
    Negotiated,
    content_kind,
    fhir_response,
    http_date,
    json_body,
    negotiate,
    parse_http_date,
    prefer_return,
    resource_body,
    transaction_session,
)
from server.fhir.interactions import Written, parse_etag
from server.fhir.operations import OperationCall, check_parameters, lookup, parameters_from_query
from server.fhir.outcome import error, information
from server.fhir.patch import fhirpath_patch, json_patch, merge_patch
from server.fhir.search import conditional, search_routes
from server.security.authorization import authorize
from server.store.fhir import FhirStore, HistoryScope, StoredResource, history_key


class OperationConvertor(Convertor[str]):
    """Matches `$name` path segments, so operations never fall into `/{type}/{id}`."""

    regex = r"\$[A-Za-z][A-Za-z0-9\-]*"

    def convert(self, value: str) -> str:
        return value[1:]

    def to_string(self, value: str) -> str:
        return "$" + value


register_url_convertor("operation", OperationConvertor())


class ResourceTypeConvertor(Convertor[str]):
    """Matches what can name a resource type (UpperCamelCase), so `/{type}` routes never
    take `metadata`, `_search` or `_history`: POST /metadata is a 405, not an unknown type."""

    regex = r"[A-Z][A-Za-z0-9]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("type", ResourceTypeConvertor())

ROUTES: list[Route] = []
Handler = Callable[..., Awaitable[Response]]


def add_route(interaction: str, methods: list[str], path: str, handler: Handler) -> None:
    """Serve `handler` at /fhir + `path` behind the authorization gate."""
    admit = authorize("fhir", interaction)

    async def endpoint(request: Request) -> Response:
        await admit(request)
        return await handler(request, **request.path_params)

    ROUTES.append(Route("/fhir" + path, endpoint, methods=methods))


def route(interaction: str, level: str, method: str, *paths: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        capability.INTERACTIONS[level].add(interaction)
        for path in paths:
            add_route(interaction, [method], path, handler)
        return handler

    return register


def store(request: Request) -> FhirStore:
    return request.app.state.fhir_store


def settings(request: Request) -> Settings:
    return request.app.state.settings


def base(request: Request) -> str:
    return settings(request).fhir_base


def resource_headers(request: Request, type_: str, id_: str, version: int, moment: datetime) -> dict[str, str]:
    return {
        "ETag": f'W/"{version}"',
        "Last-Modified": http_date(moment),
        "Content-Location": f"{base(request)}/{type_}/{id_}/_history/{version}",
    }


def written_response(request: Request, written: Written, negotiated: Negotiated) -> Response:
    headers = resource_headers(request, written.type, written.id, written.version, written.last_updated)
    if written.status == 201 or request.method in ("PUT", "PATCH"):
        headers["Location"] = headers["Content-Location"]
    prefer = prefer_return(request)
    if prefer == "minimal":
        return fhir_response(None, written.status, negotiated, headers)
    if prefer == "OperationOutcome":
        key = f"{written.type}/{written.id}"
        if written.status == 201:
            text = f"{key} created as version {written.version}"
        elif request.method == "POST":  # a conditional create that matched
            text = f"{key} (version {written.version}) already exists and matches If-None-Exist; nothing was created"
        else:
            text = f"{key} updated as version {written.version}"
        return fhir_response(information(text), written.status, negotiated, headers)
    return fhir_response(written.body, written.status, negotiated, headers)


# --- metadata -----------------------------------------------------------------------------


async def metadata(request: Request) -> Response:
    """The CapabilityStatement (`mode` full or normative), or another statement by mode."""
    negotiated = negotiate(request)
    mode = request.query_params.get("mode", "full")
    if mode in ("full", "normative"):
        return fhir_response(request.app.state.capability_statement, 200, negotiated)
    if mode in capability.OTHER_MODES:
        statement = await capability.OTHER_MODES[mode](request.app.state.services, base(request))
        return fhir_response(jsonio.dumps(statement), 200, negotiated)
    raise error(400, "not-supported", f"metadata mode {mode!r} is not supported (full, normative, {', '.join(capability.OTHER_MODES)})")


add_route("capabilities", ["GET"], "/metadata", metadata)


def build_capability_statement(settings_: Settings, started: datetime) -> bytes:
    return orjson.dumps(capability.capability_statement(settings_.fhir_base, interactions.instant(started)))


# --- batch / transaction ------------------------------------------------------------------


async def asgi_dispatch(
    request: Request,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    session: AsyncClientSession | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request through this application in process (batch entries, GETs); with
    `session`, a transaction's GET entry, which reads inside that transaction: a database
    error (PyMongoError) in it is then raised from here, not answered 500 or 503, so the
    transaction sees it and MongoDB's transient errors re-run the transaction
    (server/app.py `for_the_transaction`)."""
    path, _, query = url.partition("?")
    authorization = request.headers.get("authorization")
    if authorization:
        headers = {**headers, "authorization": authorization}
    if body is not None:
        headers = {**headers, "content-length": str(len(body))}
    full_path = "/fhir/" + path
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": request.url.scheme,
        "path": unquote(full_path),
        "raw_path": full_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": request.scope.get("client"),
        "server": request.scope.get("server"),
        "state": {} if session is None else {TRANSACTION_SESSION: session},
    }
    sent = False
    status = 500
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body or b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for key, value in message.get("headers", []):
                response_headers[key.decode().lower()] = value.decode()
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await request.app(scope, receive, send)
    return status, response_headers, b"".join(chunks)


@route("transaction", "system", "POST", "", "/")
async def batch_or_transaction(request: Request) -> Response:
    negotiated = negotiate(request)
    bundle = jsonio.parse_resource(await request.body()) if content_kind(request) == "json" else None
    if bundle is None:
        raise error(415, "not-supported", "Send the Bundle as application/fhir+json")
    kind = transaction.check_bundle(bundle, settings(request).bundle_max_entries)
    representation = prefer_return(request) == "representation" and "prefer" in request.headers

    async def dispatch(
        method: str, url: str, headers: dict[str, str], body: bytes | None, session: AsyncClientSession | None
    ) -> tuple[int, dict[str, str], bytes]:
        return await asgi_dispatch(request, method, url, headers, body, session)

    if kind == "transaction":
        result = await transaction.transaction(store(request), bundle, base(request), dispatch, representation)
    else:
        result = await transaction.batch(bundle, base(request), dispatch, representation or "prefer" not in request.headers)
    return fhir_response(result, 200, negotiated)


capability.INTERACTIONS["system"].add("batch")


# --- history ------------------------------------------------------------------------------

_HISTORY_PARAMETERS = {"_count", "_since", "_cursor", "_format", "_pretty"}


def parse_instant(value: str, name: str) -> datetime:
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise error(400, "value", f"{name}={value!r} is not a FHIR instant") from None
    if moment.tzinfo is None:
        raise error(400, "value", f"{name}={value!r} needs a time zone")
    return moment.astimezone(UTC)


def parse_count(request: Request) -> int:
    raw = request.query_params.get("_count")
    if raw is None:
        return settings(request).default_page_size
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise error(400, "value", f"_count={raw!r} is not a non-negative integer")
    count = int(raw)
    maximum = settings(request).max_page_size
    if count > maximum:
        raise error(400, "too-costly", f"_count={count} exceeds the maximum page size {maximum}")
    return count


def encode_cursor(key: tuple[datetime, str]) -> str:
    moment, ident = key
    raw = orjson.dumps([int(moment.timestamp() * 1000), ident])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        millis, ident = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(millis, int) or not isinstance(ident, str):
            raise ValueError
        return datetime.fromtimestamp(millis / 1000, UTC), ident
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise error(400, "value", "_cursor is not a cursor this server issued") from None


def _history_status(entry: StoredResource) -> tuple[str, str]:
    if entry.method == "DELETE" or entry.deleted:
        return "DELETE", "204 No Content"
    if entry.version == 1 or entry.method == "POST":
        return entry.method or "POST", "201 Created"
    return entry.method or "PUT", "200 OK"


async def history_response(request: Request, scope: HistoryScope, path: str) -> Response:
    negotiated = negotiate(request)
    unknown = set(request.query_params) - _HISTORY_PARAMETERS
    if unknown:
        raise error(400, "not-supported", f"Unknown history parameter(s): {', '.join(sorted(unknown))}")
    since = request.query_params.get("_since")
    scope = HistoryScope(scope.type, scope.id, parse_instant(since, "_since") if since else None)
    count = parse_count(request)
    cursor = request.query_params.get("_cursor")
    after = decode_cursor(cursor) if cursor else None
    page = await interactions.history(
        store(request), scope, after, count, with_total=scope.id is not None, session=transaction_session(request)
    )
    fhir_base = base(request)
    entries = []
    for entry in page.entries:
        method, status = _history_status(entry)
        url = entry.type if method == "POST" else f"{entry.type}/{entry.id}"
        entries.append(
            Entry(
                f"{fhir_base}/{entry.type}/{entry.id}",
                entry.body,
                request={"method": method, "url": url},
                response={
                    "status": status,
                    "etag": f'W/"{entry.version}"',
                    "lastModified": interactions.instant(entry.last_updated),
                },
            )
        )
    query: dict[str, str] = {"_count": str(count)}
    if since:
        query["_since"] = since
    self_query = dict(query)
    if cursor:
        self_query["_cursor"] = cursor
    links = [("self", f"{fhir_base}/{path}?{urlencode(self_query)}")]
    if page.has_more and page.entries:
        links.append(("next", f"{fhir_base}/{path}?{urlencode({**query, '_cursor': encode_cursor(history_key(page.entries[-1]))})}"))
    return fhir_response(Bundle("history", entries, page.total, links).to_bytes(), 200, negotiated)


@route("history-system", "system", "GET", "/_history")
async def history_system(request: Request) -> Response:
    return await history_response(request, HistoryScope(), "_history")


# --- operations ---------------------------------------------------------------------------


async def invoke(request: Request, name: str, type_: str | None = None, id_: str | None = None, version: str | None = None) -> Response:
    negotiated = negotiate(request)
    level = "instance" if id_ is not None else "type" if type_ is not None else "system"
    if type_ is not None:
        interactions.check_type(type_)
    if id_ is not None:
        interactions.check_id(id_)
    op = lookup(name, level, type_, request.method)
    body: dict[str, Any] | None = None
    if request.method == "POST" and (await request.body()).strip():
        document = await json_body(request)
        if not isinstance(document, dict):
            raise error(400, "invalid", "An operation body must be a Parameters resource or a resource")
        if document.get("resourceType") == "Parameters":
            check_parameters(document)
            parameters = document
        else:
            parameters, body = {"resourceType": "Parameters", "parameter": []}, document
    else:
        parameters = parameters_from_query(list(request.query_params.multi_items()))
    call = OperationCall(
        name, level, type_, id_, version, parameters, body, store(request), request.app.state.services,
        dict(request.headers),
    )
    result = await op.handler(call)
    payload = result.body if isinstance(result.body, bytes) else jsonio.dumps(result.body)
    return fhir_response(payload, result.status, negotiated)


def operation_route(path: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        add_route("operation", ["GET", "POST"], path, handler)
        return handler

    return register


@operation_route("/{operation:operation}")
async def operation_system(request: Request, operation: str) -> Response:
    return await invoke(request, operation)


@operation_route("/{type:type}/{operation:operation}")
async def operation_type(request: Request, type: str, operation: str) -> Response:
    return await invoke(request, operation, type)


@operation_route("/{type:type}/{id}/{operation:operation}")
async def operation_instance(request: Request, type: str, id: str, operation: str) -> Response:
    return await invoke(request, operation, type, id)


@operation_route("/{type:type}/{id}/_history/{vid}/{operation:operation}")
async def operation_version(request: Request, type: str, id: str, vid: str, operation: str) -> Response:
    return await invoke(request, operation, type, id, vid)


# --- type level ---------------------------------------------------------------------------


@route("history-type", "type", "GET", "/{type:type}/_history")
async def history_type(request: Request, type: str) -> Response:
    return await history_response(request, HistoryScope(type), f"{type}/_history")


@route("create", "type", "POST", "/{type:type}")
async def create(request: Request, type: str) -> Response:
    negotiated = negotiate(request)
    interactions.check_type(type)
    resource = await resource_body(request)
    if "if-none-exist" in request.headers:
        written = await conditional.create(store(request), base(request), type, resource, request.headers["if-none-exist"])
    else:
        written = await interactions.create(store(request), type, resource)
    return written_response(request, written, negotiated)


# --- instance level -----------------------------------------------------------------------


@route("history-instance", "instance", "GET", "/{type:type}/{id}/_history")
async def history_instance(request: Request, type: str, id: str) -> Response:
    return await history_response(request, HistoryScope(type, id), f"{type}/{id}/_history")


@route("vread", "instance", "GET", "/{type:type}/{id}/_history/{vid}")
async def vread(request: Request, type: str, id: str, vid: str) -> Response:
    negotiated = negotiate(request)
    stored = await interactions.vread(store(request), type, id, vid, transaction_session(request))
    headers = resource_headers(request, type, id, stored.version, stored.last_updated)
    assert stored.body is not None
    return fhir_response(search_routes.subsetted(request, type, stored.body), 200, negotiated, headers)


def not_modified(request: Request, stored: StoredResource) -> bool:
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
        return "*" in tags or str(stored.version) in tags
    if_modified_since = request.headers.get("if-modified-since")
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        if since is not None and stored.last_updated.replace(microsecond=0) <= since:
            return True
    return False


@route("read", "instance", "GET", "/{type:type}/{id}")
async def read(request: Request, type: str, id: str) -> Response:
    negotiated = negotiate(request)
    stored = await interactions.read(store(request), type, id, transaction_session(request))
    headers = resource_headers(request, type, id, stored.version, stored.last_updated)
    if not_modified(request, stored):
        return Response(status_code=304, headers=headers)
    assert stored.body is not None
    return fhir_response(search_routes.subsetted(request, type, stored.body), 200, negotiated, headers)


@route("update", "instance", "PUT", "/{type:type}/{id}")
async def update(request: Request, type: str, id: str) -> Response:
    negotiated = negotiate(request)
    if_match = parse_etag(request.headers.get("if-match"), "If-Match")
    interactions.check_type(type)
    interactions.check_id(id)
    resource = await resource_body(request)
    written = await interactions.update(store(request), type, id, resource, if_match)
    return written_response(request, written, negotiated)


@route("patch", "instance", "PATCH", "/{type:type}/{id}")
async def patch(request: Request, type: str, id: str) -> Response:
    negotiated = negotiate(request)
    if_match = parse_etag(request.headers.get("if-match"), "If-Match")
    interactions.check_type(type)
    interactions.check_id(id)
    kind = content_kind(request)
    if kind == "form":
        raise error(415, "not-supported", "PATCH takes application/json-patch+json, a FHIRPath Patch Parameters (application/fhir+json) or application/merge-patch+json")
    document = jsonio.parse(await request.body())
    if kind == "json-patch":
        patcher = json_patch(document)
    elif kind == "merge-patch" or (isinstance(document, dict) and document.get("resourceType") != "Parameters"):
        patcher = merge_patch(document)
    else:
        patcher = fhirpath_patch(document)
    written = await interactions.patch(store(request), type, id, patcher, if_match)
    return written_response(request, written, negotiated)


@route("delete", "instance", "DELETE", "/{type:type}/{id}")
async def delete(request: Request, type: str, id: str) -> Response:
    negotiate(request)
    if_match = parse_etag(request.headers.get("if-match"), "If-Match")
    written = await interactions.delete(store(request), type, id, if_match)
    headers = {"ETag": f'W/"{written.version}"'} if written else {}
    return Response(status_code=204, headers=headers)


# --- search and conditional interactions (server/fhir/search) -------------------------------
# Registered last: the compartment route /{type}/{id}/{type} must not shadow the literal
# /_history and $operation routes above.


@route("search-type", "type", "GET", "/{type:type}")
async def search_type(request: Request, type: str) -> Response:
    return await search_routes.search(request, search_routes.type_scope(type))


@route("search-type", "type", "POST", "/{type:type}/_search")
async def search_type_post(request: Request, type: str) -> Response:
    return await search_routes.search(request, search_routes.type_scope(type), await search_routes.form(request))


@route("search-system", "system", "GET", "", "/")
async def search_system(request: Request) -> Response:
    return await search_routes.search(request, search_routes.system_scope())


@route("search-system", "system", "POST", "/_search")
async def search_system_post(request: Request) -> Response:
    return await search_routes.search(request, search_routes.system_scope(), await search_routes.form(request))


@route("search-type", "type", "GET", "/{compartment:type}/{id}/{type}")
async def search_compartment(request: Request, compartment: str, id: str, type: str) -> Response:
    return await search_routes.search(request, search_routes.compartment_scope(compartment, id, type))


@route("search-type", "type", "POST", "/{compartment:type}/{id}/{type}/_search")
async def search_compartment_post(request: Request, compartment: str, id: str, type: str) -> Response:
    scope = search_routes.compartment_scope(compartment, id, type)
    return await search_routes.search(request, scope, await search_routes.form(request))


@route("update", "instance", "PUT", "/{type:type}")
async def conditional_update(request: Request, type: str) -> Response:
    negotiated = negotiate(request)
    if_match = parse_etag(request.headers.get("if-match"), "If-Match")
    interactions.check_type(type)
    resource = await resource_body(request)
    written = await conditional.update(store(request), base(request), type, resource, request.url.query, if_match)
    return written_response(request, written, negotiated)


@route("delete", "instance", "DELETE", "/{type:type}")
async def conditional_delete(request: Request, type: str) -> Response:
    negotiate(request)
    deleted = await conditional.delete(store(request), base(request), type, request.url.query)
    return Response(status_code=204, headers={"X-Deleted-Count": str(deleted)})
