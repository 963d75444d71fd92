"""The `kuroshio` command: `serve` now; loaders and maintenance commands join as
sub-commands of this one Typer application."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.config import load_settings
from terminology.cli import app as terminology_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Kuroshio health-data interoperability server")
console = Console(stderr=True)


app.add_typer(terminology_app, name="terminology")


@app.callback()
def main() -> None:
    """Kuroshio: FHIR R4, DICOMweb and DIMSE over one MongoDB store."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [env KUROSHIO_HOST, default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [env KUROSHIO_PORT, default 8080]")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port [env KUROSHIO_DICOM_PORT, default 11112]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory [env KUROSHIO_DATA_DIR, default ./kuroshio-data]")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file [env KUROSHIO_CONFIG_FILE]")] = None,
) -> None:
    """Start the server (and, without KUROSHIO_MONGODB_URI, its embedded MongoDB)."""
    import uvicorn

    from server.app import create_app
    from server.store.mongod import EmbeddedMongod, EmbeddedMongodUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, host=host, port=port, dicom_port=dicom_port, data_dir=data_dir)
    except Exception as exc:  # pydantic and file errors: one readable line, no traceback
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    with contextlib.ExitStack() as stack:
        if not settings.mongodb_uri:
            try:
                mongod = stack.enter_context(EmbeddedMongod(settings.data_dir))
            except EmbeddedMongodUnavailable as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from None
            settings = settings.model_copy(update={"mongodb_uri": mongod.uri})
            console.print(f"embedded MongoDB ready ({mongod.dbpath})")
        console.print(f"FHIR R4 at {settings.fhir_base}")
        console.print(f"DICOMweb at {settings.base_url}/dicomweb; DIMSE AE {settings.dicom_ae_title} on port {settings.dicom_port}")
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings),
                host=settings.host,
                port=settings.port,
                log_level="info",
                access_log=False,
                loop="uvloop" if sys.platform != "win32" else "asyncio",
                http="httptools",
                timeout_graceful_shutdown=10,
            )
        )
        # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; make that a no-op
        # so the embedded mongod is stopped cleanly by the ExitStack before we exit.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        server.run()
        if not server.started:
            raise typer.Exit(1)


if __name__ == "__main__":
    app(prog_name=os.path.basename(sys.argv[0]))
