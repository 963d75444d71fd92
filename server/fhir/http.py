"""The HTTP side of FHIR: media types, content negotiation, headers, Prefer, bodies.

Only JSON is implemented. A client asking for XML (Accept or `_format`) gets 406, and a
client sending XML (Content-Type) gets 415, each with an OperationOutcome, as the spec
expects of a JSON-only server. `_pretty=true` indents; otherwise the stored bytes go out
as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from starlette.requests import Request
from starlette.responses import Response

from server.fhir import jsonio
from server.fhir.outcome import FhirError, Issue, error, outcome_bytes

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
FORM = "application/x-www-form-urlencoded"

_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_XML_FORMATS = {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}


# The key of the ASGI scope's state under which a GET entry of a transaction Bundle,
# dispatched in process (routes.asgi_dispatch), carries the session of the transaction,
# so that read, vread, history and search see its uncommitted writes. Only the server sets
# scope state; a client cannot.
TRANSACTION_SESSION = "fhir_transaction_session"


def transaction_session(request: Request) -> AsyncClientSession | None:
    """The session of the transaction this request is a GET entry of, else None."""
    session: AsyncClientSession | None = request.scope.get("state", {}).get(TRANSACTION_SESSION)
    return session


@dataclass(frozen=True, slots=True)
class Negotiated:
    media_type: str
    pretty: bool


# a weight of zero in any spelling (q=0, q=0.0, q=0.000): "not acceptable" (RFC 9110 12.4.2)
_Q_ZERO = re.compile(r"\s*[qQ]\s*=\s*0(\.0{0,3})?\s*")


def _media_types(header: str) -> list[str]:
    types = []
    for item in header.split(","):
        media, *params = item.strip().split(";")
        if any(_Q_ZERO.fullmatch(p) for p in params):
            continue
        if media.strip():
            types.append(media.strip().lower())
    return types


def negotiate(request: Request) -> Negotiated:
    """Pick the response media type from `_format` or Accept (406 if JSON is not wanted)."""
    pretty = request.query_params.get("_pretty", "false").lower() == "true"
    requested = request.query_params.get("_format")
    if requested is not None:
        fmt = requested.strip().lower().split(";")[0]
        if fmt in _JSON_FORMATS:
            return Negotiated("application/json" if fmt == "application/json" else FHIR_JSON, pretty)
        raise error(
            406, "not-supported", f"_format={requested} is not supported; this server speaks JSON only"
        )
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return Negotiated(FHIR_JSON, pretty)
    wanted = _media_types(accept)
    for media in wanted:
        if media in ("application/fhir+json", "application/json+fhir", "*/*", "application/*"):
            return Negotiated(FHIR_JSON, pretty)
        if media == "application/json":
            return Negotiated("application/json", pretty)
    if wanted and all(m in _XML_FORMATS or m == "application/fhir+xml" for m in wanted):
        raise error(406, "not-supported", "XML is not supported; ask for application/fhir+json")
    raise error(406, "not-supported", f"Cannot produce {accept}; this server speaks application/fhir+json")


def content_kind(request: Request) -> str:
    """The kind of body sent: 'json', 'json-patch', 'merge-patch' or 'form' (else 415)."""
    header = request.headers.get("content-type")
    if header is None:
        raise error(415, "not-supported", "The request has a body but no Content-Type; use application/fhir+json")
    media = header.split(";")[0].strip().lower()
    if media in _JSON_FORMATS:
        return "json"
    if media == JSON_PATCH:
        return "json-patch"
    if media == MERGE_PATCH:
        return "merge-patch"
    if media == FORM:
        return "form"
    if media in _XML_FORMATS:
        raise error(415, "not-supported", "XML is not supported; send application/fhir+json")
    raise error(415, "not-supported", f"Content-Type {media} is not supported; send application/fhir+json")


async def json_body(request: Request) -> Any:
    if content_kind(request) != "json":
        raise error(415, "not-supported", "Send the body as application/fhir+json")
    return jsonio.parse(await request.body())


async def resource_body(request: Request) -> dict[str, Any]:
    if content_kind(request) != "json":
        raise error(415, "not-supported", "Send the resource as application/fhir+json")
    return jsonio.parse_resource(await request.body())


def prefer_return(request: Request) -> str:
    """The `Prefer: return=` choice: minimal, representation (default) or OperationOutcome."""
    for item in request.headers.get("prefer", "").split(","):
        key, _, value = item.strip().partition("=")
        if key.strip() == "return":
            value = value.strip().strip('"')
            if value in ("minimal", "representation", "OperationOutcome"):
                return value
    return "representation"


def prefer_handling(request: Request) -> str:
    for item in request.headers.get("prefer", "").split(","):
        key, _, value = item.strip().partition("=")
        if key.strip() == "handling" and value.strip() in ("strict", "lenient"):
            return value.strip()
    return "strict"


def http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


def fhir_response(
    body: bytes | None,
    status: int,
    negotiated: Negotiated,
    headers: dict[str, str] | None = None,
) -> Response:
    if body is not None and negotiated.pretty:
        body = jsonio.pretty(body)
    return Response(
        content=body if body is not None else b"",
        status_code=status,
        headers=headers,
        media_type=f"{negotiated.media_type}; charset=utf-8" if body is not None else None,
    )


def error_response(exc: FhirError, request: Request | None = None) -> Response:
    """An OperationOutcome for `exc`, pretty if asked, never negotiating into another error."""
    pretty = bool(request and request.query_params.get("_pretty", "").lower() == "true")
    return fhir_response(
        outcome_bytes(exc.issues or [Issue("exception", "Error")]),
        exc.status,
        Negotiated(FHIR_JSON, pretty),
        exc.headers,
    )
