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
    workers: Annotated[int | None, typer.Option(help="HTTP server processes [env KUROSHIO_WORKERS, default one per CPU]")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file [env KUROSHIO_CONFIG_FILE]")] = None,
) -> None:
    """Start the server (and, without KUROSHIO_MONGODB_URI, its embedded MongoDB)."""
    import uvicorn

    from server import workers as workers_
    from server.protocol import HttpProtocol
    from server.store.mongod import EmbeddedMongod, EmbeddedMongodUnavailable, free_port

    logging.basicConfig(level=logging.INFO, format=workers_.LOG_FORMAT)
    try:
        settings = load_settings(config, host=host, port=port, dicom_port=dicom_port, data_dir=data_dir, workers=workers)
    except Exception as exc:  # pydantic and file errors: one readable line, no traceback
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    with contextlib.ExitStack() as stack:
        if not settings.mongodb_uri:
            try:
                mongod = stack.enter_context(EmbeddedMongod(settings.data_dir, settings.mongodb_cache_size_gb))
            except EmbeddedMongodUnavailable as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from None
            mongod.watch()
            settings = settings.model_copy(update={"mongodb_uri": mongod.local_uri})
            console.print(f"embedded MongoDB ready ({mongod.dbpath})")
        if settings.port == 0 and settings.workers > 1:  # every worker must bind the same port
            settings = settings.model_copy(update={"port": free_port()})
        console.print(f"FHIR R4 at {settings.fhir_base} ({settings.workers} worker processes)")
        console.print(f"DICOMweb at {settings.base_url}/dicomweb; DIMSE AE {settings.dicom_ae_title} on port {settings.dicom_port}")
        options = dict(
            host=settings.host, port=settings.port, log_level="info", access_log=False,
            loop="uvloop" if sys.platform != "win32" else "asyncio", http=HttpProtocol, timeout_graceful_shutdown=10,
            timeout_keep_alive=settings.keep_alive_seconds,
        )
        # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; make that a no-op
        # so the embedded mongod is stopped cleanly by the ExitStack before we exit.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        if settings.workers == 1:
            from server.app import create_app

            server = uvicorn.Server(uvicorn.Config(create_app(settings), **options))
            server.run()
            if not server.started:
                raise typer.Exit(1)
        else:
            try:
                listener = workers_.bind_listener(settings.host, settings.port)
            except OSError as exc:
                console.print(f"[red]Cannot listen on {settings.host} port {settings.port}: {exc.strerror}[/red]")
                raise typer.Exit(1) from None
            if not workers_.supervise(settings, options, listener):
                raise typer.Exit(1)


# --- kuroshio wsi ----------------------------------------------------------------------------

wsi_app = typer.Typer(no_args_is_help=True, help="Whole slide images (DICOM VL Whole Slide Microscopy)")
app.add_typer(wsi_app, name="wsi")


@wsi_app.command("import")
def wsi_import(
    slide: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Slide file (TIFF, OME-TIFF, SVS, NDPI, ...)")],
    patient_id: Annotated[str, typer.Option(help="Patient ID written into the slide (the FHIR Patient's identifier)")],
    specimen_id: Annotated[str, typer.Option(help="Specimen identifier (Container Identifier and Specimen Identifier)")],
    patient_name: Annotated[str | None, typer.Option(help="Patient name, DICOM form Family^Given")] = None,
    patient_issuer: Annotated[str | None, typer.Option(help="Issuer of Patient ID")] = None,
    url: Annotated[str | None, typer.Option(help="DICOMweb base URL [default: this server's, from the settings]")] = None,
    tile_size: Annotated[int, typer.Option(min=64, max=4096, help="Tile size of re-encoded levels")] = 256,
    encoding: Annotated[str, typer.Option(help="Encoding of the tiles wsidicomizer encodes: jpeg or jpeg2000")] = "jpeg",
    offset_table: Annotated[str, typer.Option(help="Offset table: bot, eot or empty")] = "bot",
    output: Annotated[Path | None, typer.Option(file_okay=False, help="Keep the DICOM files in this new directory")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Conversion threads [default: one per core]")] = None,
) -> None:
    """Convert a slide into a DICOM WSI pyramid with wsidicomizer and store it by STOW-RS."""
    import shutil
    import tempfile
    import threading

    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from server.dicom import wsi_import as importer

    if encoding not in importer.ENCODINGS or offset_table not in importer.OFFSET_TABLES:
        console.print(f"[red]--encoding is one of {importer.ENCODINGS}, --offset-table one of {importer.OFFSET_TABLES}[/red]")
        raise typer.Exit(2)
    if output is not None and output.exists():
        console.print(f"[red]{output} already exists[/red]")
        raise typer.Exit(2)
    dicomweb = url or load_settings().base_url + "/dicomweb"
    work = Path(tempfile.mkdtemp(prefix="kuroshio-wsi-"))
    target = output or work / "dicom"
    metadata = importer.metadata_for(patient_id, patient_name, specimen_id)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["files"] = importer.convert(slide, target, metadata, issuer=patient_issuer, tile_size=tile_size,
                                                encoding=encoding, offset_table=offset_table, workers=workers)
        except Exception as exc:  # reported below, in the main thread
            outcome["error"] = exc

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            converting = progress.add_task(f"converting {slide.name}", total=None)
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            while thread.is_alive():
                progress.update(converting, completed=importer.written_bytes(target))
                thread.join(0.2)
            error = outcome.get("error")
            if error is not None:
                console.print(f"[red]{error}[/red]")
                raise typer.Exit(2)
            files: list[Path] = outcome["files"]  # type: ignore[assignment]
            size = sum(f.stat().st_size for f in files)
            progress.update(converting, total=size, completed=size)
            sending = progress.add_task(f"storing {len(files)} instances at {dicomweb}", total=size)
            try:
                stored = importer.store(files, dicomweb, lambda n: progress.advance(sending, n))
            except httpx.HTTPError as exc:
                console.print(f"[red]Cannot store at {dicomweb}: {exc}[/red]")
                raise typer.Exit(1) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for sop, reason in stored.failed:
        console.print(f"[red]refused {sop}: failure reason 0x{reason:04X}[/red]")
    if stored.status not in (200, 202) or stored.failed:
        console.print(f"[red]STOW-RS answered {stored.status} {stored.message}[/red]")
        raise typer.Exit(1)
    console.print(f"stored {len(stored.stored)} instances of study {stored.study} (patient {patient_id}, specimen {specimen_id})")
    typer.echo(stored.study or "")


if __name__ == "__main__":
    app(prog_name=os.path.basename(sys.argv[0]))
