"""`kuroshio terminology ...`: load terminologies and re-apply mappings, with a progress bar.

Each command is a thin shell over a library call (terminology.loaders.*,
terminology.normalization.reapply), run against KUROSHIO_MONGODB_URI or, without it,
the embedded mongod under the data directory (the same one `kuroshio serve` uses; stop
the server first, as only one process can own that database directory).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.config import Settings, load_settings
from server.store.database import Store
from terminology.definitions import install

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, help="Terminology: load code systems, value sets and maps; re-apply mappings")
load_app = typer.Typer(no_args_is_help=True, help="Load a terminology into the server's database")
app.add_typer(load_app, name="load")
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML settings file [env KUROSHIO_CONFIG_FILE]")]


@contextlib.contextmanager
def database(config: Path | None) -> Iterator[Settings]:
    """Settings whose mongodb_uri is reachable (starting the embedded mongod if needed)."""
    from server.store.mongod import EmbeddedMongod, EmbeddedMongodUnavailable

    settings = load_settings(config)
    if settings.mongodb_uri:
        yield settings
        return
    try:
        with EmbeddedMongod(settings.data_dir) as mongod:
            yield settings.model_copy(update={"mongodb_uri": mongod.uri})
    except EmbeddedMongodUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


def run(config: Path | None, job: Callable[[Store, Callable[[int, int | None, str], None]], Awaitable[T]]) -> T:
    """Open the store, run `job` with a rich progress bar, close everything."""
    with database(config) as settings, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task("loading", total=None)

        def progress(advance: int, total: int | None, description: str) -> None:
            bar.update(task, advance=advance, total=total, description=description)

        async def main() -> T:
            assert settings.mongodb_uri is not None
            store = await Store.open(settings.mongodb_uri, settings.mongodb_database)
            install(store, settings)  # definitions (and normalization) join the write path
            try:
                return await job(store, progress)
            finally:
                await store.close()

        return asyncio.run(main())


def report(result: object) -> None:
    from terminology.loaders.common import LoadResult

    assert isinstance(result, LoadResult)
    console.print(f"[green]{result.resources} resource(s), {result.concepts} concept(s) loaded[/green]")
    for line in result.skipped[:20]:
        console.print(f"[yellow]skipped[/yellow] {line}")
    if len(result.skipped) > 20:
        console.print(f"[yellow]... and {len(result.skipped) - 20} more skipped[/yellow]")


def load(config: Path | None, job: Callable[[Store, Callable[[int, int | None, str], None]], Awaitable[object]], refused: type[Exception]) -> None:
    """Run a loader and report; input the loader refuses is one red line and exit code 2."""
    try:
        report(run(config, job))
    except refused as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@load_app.command("package")
def load_package(
    source: Annotated[Path, typer.Argument(exists=True, help="package.tgz or unpacked package folder")],
    config: ConfigOption = None,
) -> None:
    """A FHIR npm package: its CodeSystems, ValueSets, ConceptMaps and NamingSystems."""
    from terminology.loaders.npm import load_package as load_npm

    load(config, lambda store, progress: load_npm(store, source, progress=progress), ValueError)


@load_app.command("loinc")
def load_loinc(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="LOINC release folder")],
    config: ConfigOption = None,
) -> None:
    """LOINC from a release folder (LoincTable/, AccessoryFiles/)."""
    from terminology.loaders.loinc import LoincReleaseError, load_loinc as load_release

    load(config, lambda store, progress: load_release(store, folder, progress), LoincReleaseError)


@load_app.command("snomed")
def load_snomed(
    source: Annotated[Path, typer.Argument(exists=True, help="RF2 release folder (with Snapshot/); with --gps, the hl7.terminology.r4 package or the GPS ValueSet JSON")],
    gps: Annotated[bool, typer.Option("--gps", help="load the SNOMED CT Global Patient Set as a SNOMED CT fragment")] = False,
    language_refset: Annotated[str, typer.Option(help="language reference set for displays (RF2)")] = "900000000000509007",
    config: ConfigOption = None,
) -> None:
    """SNOMED CT from an RF2 snapshot, or the Global Patient Set (--gps)."""
    from terminology.loaders.snomed import Rf2Error, load_gps, load_rf2

    if gps:
        load(config, lambda store, progress: load_gps(store, source, progress), Rf2Error)
    else:
        load(config, lambda store, progress: load_rf2(store, source, language_refset, progress), Rf2Error)


@load_app.command("local")
def load_local(
    table: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV or XLSX code table")],
    system: Annotated[str, typer.Option(help="canonical URL of the local code system")],
    name: Annotated[str, typer.Option(help="resource id for the CodeSystem (the ConceptMap gets <name>-map)")],
    language: Annotated[str | None, typer.Option(help="language of the local displays, e.g. zh-CN")] = None,
    config: ConfigOption = None,
) -> None:
    """A local code table: local code, display, target system, target code, equivalence."""
    from terminology.loaders.local import LocalTableError, load_local_table

    load(config, lambda store, progress: load_local_table(store, table, system, name, language), LocalTableError)


@app.command("reapply")
def reapply(
    resource_type: Annotated[list[str] | None, typer.Option("--type", help="resource type(s); default: all normalized types")] = None,
    config: ConfigOption = None,
) -> None:
    """Re-apply the current mappings to stored data (after a ConceptMap changed)."""
    from terminology.normalization import NORMALIZED_TYPES, reapply as reapply_all

    types = tuple(resource_type or NORMALIZED_TYPES)
    changed = run(config, lambda store, progress: reapply_all(store, types, progress))
    console.print(f"[green]{changed} resource(s) updated[/green]")
