"""The FastAPI application: routers, the store, cross-cutting middleware, and errors.

`create_app` takes settings whose `mongodb_uri` is already known (the CLI starts the
embedded mongod first), so any number of server processes can share one database.

Errors are answered in the form of the interface that was called: an OperationOutcome
under /fhir (unknown routes, wrong methods, oversized bodies and unexpected failures
included), and the interface's own form elsewhere. A client never sees a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.dicom import service as dicom_service
from server.fhir import library_checks
from server.fhir import routes as fhir_routes
from server.fhir.http import error_response, transaction_session
from server.fhir.interactions import now
from server.fhir.outcome import FhirError, Issue
from server.fhir.search import custom as search_custom
from server.security import audit
from server.security.authorization import Forbidden
from server.store.database import Store, TransactionTooLarge
from server.store.fhir import FhirStore
from server.store.search import SearchStore
from terminology import operations as terminology_operations  # noqa: F401  (registers $lookup, $expand, ...)
from terminology.builtin import load_ucum
from terminology.definitions import install as install_terminology

log = logging.getLogger("kuroshio")
CLIENT_CLOSED_REQUEST = 499  # audited status of a request its client abandoned mid-body

# Path prefix -> how errors are rendered there; the FHIR form is the default.
ErrorRenderer = Callable[[Request, int, str], Response]
ERROR_RENDERERS: dict[str, ErrorRenderer] = {"/dicomweb": dicom_service.routes.error_response}


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body exceeds the limit of {limit} bytes")
        self.limit = limit


def _fhir_error(request: Request, status: int, message: str) -> Response:
    code = {
        401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
        406: "not-supported", 409: "conflict", 412: "conflict", 413: "too-costly",
        415: "not-supported", 429: "throttled", 503: "transient",
    }.get(status, "exception" if status >= 500 else "invalid")
    return error_response(FhirError(status, [Issue(code, message)]), request)


def render_error(request: Request, status: int, message: str) -> Response:
    for prefix, renderer in ERROR_RENDERERS.items():
        if request.url.path.startswith(prefix):
            return renderer(request, status, message)
    return _fhir_error(request, status, message)


class BodyLimit:
    """Refuse request bodies over the limit (413) before and while they are read.

    Paths listed in `exempt` (DICOM uploads, which stream to disk) are not limited.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                request = Request(scope)
                await render_error(request, 413, str(BodyTooLarge(self.limit)))(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class AuditedExchange:
    """Outermost middleware: every HTTP exchange is audited with its final status, and an
    unexpected exception is answered with a 500 in the interface's error form.

    Starlette's own handler for `Exception` re-raises after responding, which makes the
    server drop the connection; this answers cleanly and logs the traceback instead.

    The exception: a database error in a transaction's GET entry, dispatched in process
    with the transaction's session, is raised on to the transaction (see
    `for_the_transaction`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client closed the connection before its body was all sent: there is no one
            # to answer and nothing went wrong here, so no traceback (it was logged as an
            # unhandled error) and no 500; the audit records 499, nginx's "client closed".
            log.info("client disconnected during %s %s", scope.get("method"), scope.get("path"))
            status = status or CLIENT_CLOSED_REQUEST
        except Exception as exc:
            if for_the_transaction(Request(scope), exc):
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status:
                raise
            response = render_error(Request(scope), 500, "Internal server error; the failure has been logged")
            await response(scope, receive, tracking_send)
        finally:
            state = scope.get("state", {})
            audit.record(
                state.get("principal"), state.get("access"), status or 500,
                f"{scope['method']} {scope['path']}",
            )


def for_the_transaction(request: Request, exc: Exception) -> bool:
    """Whether `exc` is a database error in a transaction's GET entry (run in process with
    the transaction's session, routes.asgi_dispatch): it is the transaction's to handle,
    not a 500 or 503 here. MongoDB's transient transaction errors (a write conflict,
    SnapshotUnavailable, an aborted transaction) then make the store re-run the whole
    transaction, as they do for its writes; any other ends it as for a write (the
    transaction route's own answer: 500, or 503 for a lost connection)."""
    return isinstance(exc, PyMongoError) and transaction_session(request) is not None


def settle_heap() -> None:
    """Take what start-up built (R4 definitions, search plans, terminology, UCUM units:
    about 260,000 objects) out of the cyclic garbage collector's view. They live as long as the process,
    yet every full collection walked them all, holding the GIL: a 150 ms stall of every
    request in flight, measured under a load of creates. Refcounting still frees them."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, dimse: bool = True) -> FastAPI:
    """The app of one server process; with `dimse`, it also runs the DIMSE AE."""
    if not settings.mongodb_uri:
        raise ValueError("create_app needs settings.mongodb_uri (the CLI starts the embedded mongod)")
    uri = settings.mongodb_uri

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        units = asyncio.create_task(asyncio.to_thread(load_ucum))  # a second of parsing, beside the I/O below
        store = await Store.open(uri, settings.mongodb_database)
        library_checks.configure(settings.validation_workers)
        app.state.store = store
        app.state.fhir_store = FhirStore(store)
        await app.state.fhir_store.upgrade()
        app.state.services["terminology"] = install_terminology(store, settings)
        app.state.capability_statement = fhir_routes.build_capability_statement(settings, now())
        custom_parameters = asyncio.create_task(search_custom.refresh_loop(SearchStore(store)))
        # DICOM: archive, DIMSE AE and ImagingStudy reflection (server/dicom/service.py)
        dicom = await dicom_service.start(app, settings, store, app.state.fhir_store, dimse)
        await units
        settle_heap()
        try:
            yield
        finally:
            await dicom.stop()
            custom_parameters.cancel()
            library_checks.shutdown()
            await store.close()

    app = FastAPI(
        title="Kuroshio",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        # no OpenTelemetry here: FastAPI otherwise asks on every request whether a
        # tracer, meter or logger provider has been configured since
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.services = {}
    audit.configure(settings.data_dir)
    app.router.routes.extend(fhir_routes.ROUTES)
    dicom_service.install(app, settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, exempt=("/dicomweb",))
    app.add_middleware(AuditedExchange)
    return app


def allowed_methods(request: Request) -> str:
    """The Allow header of a 405: every method served at the path. Starlette names only
    the first route that matches the path, and each FHIR interaction is its own route."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def fhir_error(request: Request, exc: FhirError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"No route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not supported on {request.url.path}"
            headers["Allow"] = allowed_methods(request)
        else:
            message = str(exc.detail)
        response = render_error(request, exc.status_code, message)
        response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return render_error(request, 400, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return render_error(request, 403, str(exc))

    @app.exception_handler(ConnectionFailure)
    async def database_unavailable(request: Request, exc: ConnectionFailure) -> Response:
        if for_the_transaction(request, exc):
            raise exc
        log.error("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        response = render_error(request, 503, "The database is unavailable; try again later")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(TransactionTooLarge)
    async def transaction_too_large(request: Request, exc: TransactionTooLarge) -> Response:
        log.warning("transaction too large on %s %s: %s", request.method, request.url.path, exc)
        return render_error(request, 413, "The request's writes are too large for one database transaction; nothing was written")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> Response:
        return render_error(request, 413, str(exc))

