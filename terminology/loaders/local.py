"""A hospital's local code table (CSV or XLSX) -> a CodeSystem and a ConceptMap.

Columns (header names, case-insensitive): `local_code`, `local_display`, `target_system`,
`target_code`, `equivalence`, and optionally `target_display`. Displays may be in any
language (Chinese names included; the file is read as UTF-8, with or without BOM).
The local codes become a CodeSystem in the hospital's namespace, the mappings one
ConceptMap with a group per target system; both are written through the FHIR API, so
the next request, the ingest normalization and $translate use them at once.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.store.database import Store
from server.store.fhir import FhirStore
from terminology.conceptmaps import NORMALIZE_TAG
from terminology.loaders.common import LoadResult, put_resource

REQUIRED = ("local_code", "local_display", "target_system", "target_code", "equivalence")
EQUIVALENCES = {
    "relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes",
    "inexact", "unmatched", "disjoint",
}
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class LocalTableError(ValueError):
    """The table cannot be loaded (missing columns, bad rows); the message says where."""


def read_table(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        sheet = load_workbook(path, read_only=True, data_only=True).active
        if sheet is None:
            raise LocalTableError(f"{path} has no worksheet")
        rows = [["" if v is None else str(v).strip() for v in row] for row in sheet.iter_rows(values_only=True)]
    else:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = [[v.strip() for v in row] for row in csv.reader(handle)]
    rows = [r for r in rows if any(r)]
    if not rows:
        raise LocalTableError(f"{path} is empty")
    header = [h.lower().replace(" ", "_") for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise LocalTableError(f"{path.name}: missing column(s) {', '.join(missing)}; the header must name {', '.join(REQUIRED)}")
    return [dict(zip(header, r + [""] * (len(header) - len(r)))) for r in rows[1:]]


def build_resources(
    rows: list[dict[str, str]], system: str, name: str, language: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CodeSystem of local codes and the ConceptMap to the standard codes."""
    if not _ID.fullmatch(name):
        raise LocalTableError(f"{name!r} is not usable as a resource id ([A-Za-z0-9-.]{{1,64}})")
    concepts: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for number, row in enumerate(rows, start=2):
        code, display = row["local_code"], row["local_display"]
        target_system, target_code = row["target_system"], row["target_code"]
        equivalence = row["equivalence"].lower() or "equivalent"
        if not code:
            raise LocalTableError(f"row {number}: local_code is empty")
        if equivalence not in EQUIVALENCES:
            raise LocalTableError(f"row {number}: equivalence {row['equivalence']!r} is not one of {', '.join(sorted(EQUIVALENCES))}")
        concepts.setdefault(code, {"code": code, **({"display": display} if display else {})})
        if not target_system:
            continue
        if not target_code and equivalence != "unmatched":
            raise LocalTableError(f"row {number}: target_code is empty")
        element = groups[target_system].setdefault(code, {"code": code, **({"display": display} if display else {}), "target": []})
        target: dict[str, Any] = {"equivalence": equivalence}
        if target_code:
            target = {"code": target_code, **({"display": row["target_display"]} if row.get("target_display") else {}), **target}
        element["target"].append(target)
    code_system: dict[str, Any] = {
        "resourceType": "CodeSystem",
        "id": name,
        "url": system,
        "name": re.sub(r"[^A-Za-z0-9_]", "_", name),
        "status": "active",
        "content": "complete",
        "caseSensitive": True,
        "concept": list(concepts.values()),
    }
    if language:
        code_system["language"] = language
    concept_map = {
        "resourceType": "ConceptMap",
        "id": f"{name}-map",
        "meta": {"tag": [NORMALIZE_TAG]},
        "url": f"{system.rstrip('/')}-map",
        "name": code_system["name"] + "_map",
        "status": "active",
        "sourceUri": system,
        "group": [
            {"source": system, "target": target_system, "element": list(elements.values())}
            for target_system, elements in groups.items()
        ],
    }
    return code_system, concept_map


async def load_local_table(store: Store, path: Path, system: str, name: str, language: str | None = None) -> LoadResult:
    code_system, concept_map = build_resources(read_table(path), system, name, language)
    db = FhirStore(store)
    result = LoadResult()
    await put_resource(db, code_system, result)
    await put_resource(db, concept_map, result)
    result.concepts = len(code_system["concept"])
    return result
