"""FHIR npm packages (`package.tgz` or an unpacked folder): hl7.terminology.r4,
hl7.fhir.r4.examples, ...

Every CodeSystem, ValueSet, ConceptMap and NamingSystem in the package is written
through the FHIR API (so it is validated, versioned and becomes a definition at once).
The tarball is read member by member with `tarfile`, never unpacked to disk.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.store.database import Store
from server.store.fhir import FhirStore
from terminology.loaders.common import LoadResult, Progress, no_progress, put_resource

TYPES = ("CodeSystem", "ValueSet", "ConceptMap", "NamingSystem")


def _wanted(name: str, types: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".json") and base.split("-", 1)[0] in types


def package_resources(source: Path, types: tuple[str, ...] = TYPES) -> Iterator[dict[str, Any]]:
    """The package's resources of the given types (file names start with the type)."""
    if source.is_dir():
        folder = source / "package" if (source / "package").is_dir() else source
        for path in sorted(folder.glob("*.json")):
            if _wanted(path.name, types):
                resource = json.loads(path.read_text(encoding="utf-8-sig"))
                if resource.get("resourceType") in types:
                    yield resource
        return
    with tarfile.open(source, "r:*") as archive:
        for member in archive:
            if not member.isfile() or not _wanted(member.name, types) or member.name.count("/") > 1:
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            resource = json.loads(handle.read().decode("utf-8-sig"))
            if resource.get("resourceType") in types:
                yield resource


def count_resources(source: Path, types: tuple[str, ...] = TYPES) -> int:
    if source.is_dir():
        folder = source / "package" if (source / "package").is_dir() else source
        return sum(1 for p in folder.glob("*.json") if _wanted(p.name, types))
    with tarfile.open(source, "r:*") as archive:
        return sum(1 for m in archive if m.isfile() and _wanted(m.name, types) and m.name.count("/") <= 1)


async def load_package(
    store: Store, source: Path, types: tuple[str, ...] = TYPES, progress: Progress = no_progress
) -> LoadResult:
    db = FhirStore(store)
    result = LoadResult()
    total = count_resources(source, types)
    for resource in package_resources(source, types):
        await put_resource(db, resource, result)
        progress(1, total, "package resources")
    return result
