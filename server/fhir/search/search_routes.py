"""The HTTP side of search: which scope a route searches, and its parameters.

The route functions themselves live in server/fhir/routes.py with every other route;
this module turns a request into a `SearchRequest` (query string, or form body for
POST `_search`) and the answer into a response, so routes.py stays a list of routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from server.fhir import interactions
from server.fhir.definitions import resource_types
from server.fhir.http import content_kind, fhir_response, negotiate, prefer_handling, transaction_session
from server.fhir.outcome import error
from server.fhir.search import query as parsing
from server.fhir.search.service import Search, SearchRequest, compartment_types, subset
from server.store.search import SearchStore


@dataclass(frozen=True)
class Scope:
    types: tuple[str, ...]
    path: str
    compartment: tuple[str, str] | None = None


def type_scope(type_: str) -> Scope:
    interactions.check_type(type_)
    return Scope((type_,), type_)


def system_scope() -> Scope:
    return Scope(tuple(sorted(resource_types())), "")


def compartment_scope(compartment: str, id_: str, type_: str) -> Scope:
    interactions.check_type(compartment)
    interactions.check_id(id_)
    if type_ == "*":
        return Scope(compartment_types(compartment), f"{compartment}/{id_}/*", (compartment, id_))
    interactions.check_type(type_)
    compartment_types(compartment)
    return Scope((type_,), f"{compartment}/{id_}/{type_}", (compartment, id_))


async def form(request: Request) -> list[tuple[str, str]]:
    """The parameters of a POST _search body (application/x-www-form-urlencoded)."""
    body = await request.body()
    if not body.strip():
        return []
    if content_kind(request) != "form":
        raise error(415, "not-supported", "POST _search takes application/x-www-form-urlencoded parameters")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise error(400, "invalid", "The form body is not UTF-8") from None


def subsetted(request: Request, type_: str, body: bytes) -> bytes:
    """A read's or vread's resource reduced by `_summary`/`_elements` (http.html#read),
    parsed and applied as a search applies them to its matches (tagged SUBSETTED)."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k in ("_summary", "_elements")]
    if not items:
        return body
    return subset(body, type_, parsing.parse((type_,), items, lenient=False, max_count=0), "match")


def searcher(request: Request) -> Search:
    """The app's search service; for a transaction's GET entry, one inside its session."""
    state = request.app.state
    search = getattr(state, "search", None)
    if search is None:
        search = Search(SearchStore(state.store), state.settings.fhir_base)
        state.search = search
    session = transaction_session(request)
    return search if session is None else Search(search.db.in_session(session), search.base)


async def search(request: Request, scope: Scope, extra: list[tuple[str, str]] | None = None) -> Response:
    negotiated = negotiate(request)
    settings = request.app.state.settings
    items = list(request.query_params.multi_items()) + (extra or [])
    search_request = SearchRequest(
        scope.types, items, scope.path, prefer_handling(request) == "lenient", scope.compartment,
        settings.default_page_size, settings.max_page_size,
    )
    body = await searcher(request).run(search_request)
    return fhir_response(body, 200, negotiated)
