"""Wiring of the DICOM side into the app: the DICOMweb router, its error form and CORS,
and the run-time parts the lifespan starts and stops (archive, DIMSE AE, FHIR reflection)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.dicom import routes
from server.dicom.archive import Archive
from server.dicom.dimse import ApplicationEntity, parse_remote_aes
from server.dicom.imaging_study import Reflector
from server.store.database import Store
from server.store.fhir import FhirStore


class DicomWebCors:
    """CORS for /dicomweb only (browser viewers on another origin), when configured."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=origins, allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"], expose_headers=["Warning", "Content-Location"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/dicomweb"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    app.router.routes[:0] = routes.FIRST_ROUTES  # slide tiles: tried before every other route
    app.include_router(routes.router)

    @app.exception_handler(routes.DicomWebError)
    async def dicomweb_error(request: Request, exc: routes.DicomWebError) -> Response:
        return routes.error_response(request, exc.status, str(exc))

    origins = [o.strip() for o in settings.dicomweb_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(DicomWebCors, origins=origins)


@dataclass
class DicomRuntime:
    archive: Archive
    ae: ApplicationEntity | None
    reflector: Reflector

    async def stop(self) -> None:
        if self.ae is not None:
            await asyncio.to_thread(self.ae.stop)
        await self.reflector.stop()


async def start(app: FastAPI, settings: Settings, store: Store, fhir_store: FhirStore, dimse: bool) -> DicomRuntime:
    """Open the archive and start the ImagingStudy reflection; with `dimse`, also listen
    on the DICOM port (one process of several does)."""
    archive = Archive(store, settings.data_dir / "dicom")
    app.state.dicom = archive
    ae = None
    if dimse:
        ae = ApplicationEntity(
            archive, settings.dicom_ae_title, parse_remote_aes(settings.dicom_remote_aes), asyncio.get_running_loop()
        )
        ae.start(settings.host, settings.dicom_port)
    reflector = Reflector(archive, fhir_store, settings.base_url + "/dicomweb", settings.fhir_base)
    reflector.start()
    return DicomRuntime(archive, ae, reflector)
