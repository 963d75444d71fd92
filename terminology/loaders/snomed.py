"""SNOMED CT: an RF2 snapshot, and the Global Patient Set that hl7.terminology.r4 carries.

RF2 (tab-separated, UTF-8, one header line) is read from a release folder's `Snapshot`
files: concepts (`sct2_Concept_Snapshot*`), descriptions (`sct2_Description_Snapshot*`),
relationships (`sct2_Relationship_Snapshot*`, is-a = 116680003) and the language reference
set (`der2_cRefset_LanguageSnapshot*`). Displays are the preferred synonyms of the
language refset (en-US by default), every active description is a designation (FSN or
synonym, with its language), active is-a relationships give `parent` and the transitive
closure, other active relationships become properties named by their type's concept id.

The version is the edition URI SNOMED defines: http://snomed.info/sct/[module]/version/[YYYYMMDD]
(the module that owns most concepts, the latest effectiveTime). A full International
Edition (~370k concepts, ~1.5M descriptions) is read in one pass per file and loaded
in batches; nothing stays in the server's memory.

The GPS is a ValueSet enumerating 26,158 concepts with their FSNs; loaded as a SNOMED CT
`fragment` of the edition it names (displays are the FSNs without their semantic tag),
it makes SNOMED-coded data checkable where no licensed release is at hand.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.store.database import Store
from terminology.concepts import Concept, close_hierarchy
from terminology.loaders.common import LoadResult, Progress, bulk_code_system, no_progress

SNOMED = "http://snomed.info/sct"
IS_A = "116680003"
FSN = "900000000000003001"
SYNONYM = "900000000000013009"
PREFERRED = "900000000000548007"
US_ENGLISH = "900000000000509007"
FULLY_DEFINED = "900000000000073002"
MODEL_MODULE = "900000000000012004"
INTERNATIONAL = "900000000000207008"
_SEMANTIC_TAG = re.compile(r"\s*\([^()]*\)\s*$")
USE_DISPLAY = {FSN: "Fully specified name", SYNONYM: "Synonym"}
COPYRIGHT = (
    "This value set includes content from SNOMED CT, which is copyright 2002+ International Health "
    "Terminology Standards Development Organisation (SNOMED International), and distributed by agreement "
    "between SNOMED International and HL7. Implementer use of SNOMED CT is not covered by this agreement."
)


class Rf2Error(ValueError):
    """The folder is not an RF2 snapshot (missing files or wrong columns)."""


def _find(folder: Path, prefix: str) -> Path:
    matches = sorted(p for p in folder.rglob(f"{prefix}*.txt") if "Snapshot" in str(p))
    if not matches:
        raise Rf2Error(f"no {prefix}*.txt snapshot file under {folder}")
    return matches[0]


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise Rf2Error(f"{path.name} lacks the RF2 columns {', '.join(missing)}")
        yield from reader


def edition_uri(module: str, effective_time: str) -> str:
    return f"{SNOMED}/{module}/version/{effective_time}"


def read_snapshot(folder: Path, language_refset: str = US_ENGLISH) -> tuple[dict[str, Any], list[Concept]]:
    concepts: dict[str, Concept] = {}
    modules: Counter[str] = Counter()
    latest = ""
    definition: dict[str, str] = {}
    for row in _rows(_find(folder, "sct2_Concept_Snapshot"), ("id", "effectiveTime", "active", "moduleId", "definitionStatusId")):
        code = row["id"]
        concepts[code] = Concept(code, inactive=row["active"] != "1", properties=[
            {"code": "moduleId", "valueCode": row["moduleId"]},
            {"code": "effectiveTime", "valueString": row["effectiveTime"]},
        ])
        definition[code] = row["definitionStatusId"]
        modules[row["moduleId"]] += 1
        latest = max(latest, row["effectiveTime"])
    if not concepts:
        raise Rf2Error("the concept snapshot is empty")

    preferred: set[str] = set()
    try:
        language_file = _find(folder, "der2_cRefset_LanguageSnapshot")
    except Rf2Error:
        language_file = None
    if language_file is not None:
        columns = ("referencedComponentId", "refsetId", "active", "acceptabilityId")
        for row in _rows(language_file, columns):
            if row["active"] == "1" and row["refsetId"] == language_refset and row["acceptabilityId"] == PREFERRED:
                preferred.add(row["referencedComponentId"])

    fsn: dict[str, str] = {}
    columns = ("id", "active", "conceptId", "languageCode", "typeId", "term")
    for row in _rows(_find(folder, "sct2_Description_Snapshot"), columns):
        concept = concepts.get(row["conceptId"])
        if concept is None or row["active"] != "1":
            continue
        use = row["typeId"]
        concept.designations.append({
            "language": row["languageCode"],
            "use": {"system": SNOMED, "code": use, "display": USE_DISPLAY.get(use, use)},
            "value": row["term"],
        })
        if use == FSN:
            fsn[concept.code] = row["term"]
        elif row["id"] in preferred and use == SYNONYM:
            concept.display = row["term"]

    attributes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    columns = ("sourceId", "destinationId", "active", "typeId", "relationshipGroup")
    for row in _rows(_find(folder, "sct2_Relationship_Snapshot"), columns):
        if row["active"] != "1" or row["sourceId"] not in concepts:
            continue
        if row["typeId"] == IS_A:
            concepts[row["sourceId"]].parents.append(row["destinationId"])
        else:
            attributes[row["sourceId"]].append({"code": row["typeId"], "valueCode": row["destinationId"]})

    for order, concept in enumerate(concepts.values()):
        concept.order = order
        concept.display = concept.display or (_SEMANTIC_TAG.sub("", fsn[concept.code]) if concept.code in fsn else None)
        concept.properties += [
            {"code": "sufficientlyDefined", "valueBoolean": definition[concept.code] == FULLY_DEFINED},
            {"code": "inactive", "valueBoolean": concept.inactive},
            *attributes.get(concept.code, []),
        ]
        concept.parents = list(dict.fromkeys(concept.parents))
    close_hierarchy(concepts)
    module = next((m for m, _ in modules.most_common() if m != MODEL_MODULE), INTERNATIONAL)
    return _header(module, latest, "complete"), list(concepts.values())


def _header(module: str, effective_time: str, content: str) -> dict[str, Any]:
    return {
        "resourceType": "CodeSystem",
        "id": f"sct-{module}-{effective_time}",
        "url": SNOMED,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.16.840.1.113883.6.96"}],
        "version": edition_uri(module, effective_time),
        "name": "SNOMED_CT",
        "title": "SNOMED CT",
        "status": "active",
        "publisher": "SNOMED International",
        "copyright": COPYRIGHT,
        "caseSensitive": False,
        "hierarchyMeaning": "is-a",
        "content": content,
        "property": [
            {"code": "inactive", "uri": "http://hl7.org/fhir/concept-properties#inactive", "type": "boolean"},
            {"code": "sufficientlyDefined", "uri": f"{SNOMED}/sufficientlyDefined", "type": "boolean"},
            {"code": "moduleId", "uri": f"{SNOMED}/moduleId", "type": "code"},
            {"code": "effectiveTime", "uri": f"{SNOMED}/effectiveTime", "type": "string"},
            {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent", "type": "code"},
        ],
    }


def read_gps(value_set: dict[str, Any]) -> tuple[dict[str, Any], list[Concept]]:
    """The GPS ValueSet as a SNOMED CT fragment of the edition it was drawn from."""
    includes = [i for i in (value_set.get("compose") or {}).get("include", []) if i.get("system") == SNOMED]
    if not includes:
        raise Rf2Error("the value set includes no SNOMED CT concepts")
    version = includes[0].get("version") or edition_uri(INTERNATIONAL, str(value_set.get("version", "")))
    match = re.fullmatch(rf"{re.escape(SNOMED)}/(\d+)/version/(\d{{8}})", version)
    if match is None:
        raise Rf2Error(f"{version!r} is not a SNOMED CT edition/version URI")
    concepts = []
    for include in includes:
        for item in include.get("concept", []):
            name = item.get("display") or ""
            concepts.append(Concept(
                item["code"], _SEMANTIC_TAG.sub("", name) or None, order=len(concepts),
                designations=[{"language": "en", "use": {"system": SNOMED, "code": FSN, "display": USE_DISPLAY[FSN]}, "value": name}] if name else [],
            ))
    header = _header(match.group(1), match.group(2), "fragment")
    header["id"] = f"sct-gps-{match.group(2)}"
    header["title"] = "SNOMED CT (Global Patient Set fragment)"
    return header, concepts


async def load_rf2(store: Store, folder: Path, language_refset: str = US_ENGLISH, progress: Progress = no_progress) -> LoadResult:
    header, concepts = read_snapshot(folder, language_refset)
    return await bulk_code_system(store, header, concepts, len(concepts), progress)


async def load_gps(store: Store, source: Path, progress: Progress = no_progress) -> LoadResult:
    """Load the GPS from its ValueSet file, or from a package folder/tarball holding it."""
    from terminology.loaders.npm import package_resources

    if source.is_file() and source.suffix == ".json":
        value_set = json.loads(source.read_text(encoding="utf-8-sig"))
    else:
        value_set = next(
            (r for r in package_resources(source, ("ValueSet",)) if r.get("id") == "snomed-intl-gps"), None
        )
        if value_set is None:
            raise Rf2Error(f"{source} holds no ValueSet snomed-intl-gps")
    header, concepts = read_gps(value_set)
    return await bulk_code_system(store, header, concepts, len(concepts), progress)
