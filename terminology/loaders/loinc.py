"""LOINC from a release folder (the layout Regenstrief distributes).

Reads `LoincTable/Loinc.csv` (terms), `AccessoryFiles/PartFile/Part.csv` and
`LoincPartLink_Primary.csv` (parts and each term's primary parts), the answer files,
`ComponentHierarchyBySystem` (the multi-axial hierarchy, giving `parent` and the is-a
closure), `ConsumerName` and the linguistic variants. The result is one code system,
http://loinc.org, holding terms, parts (LP) and answer lists and answers (LL, LA):

- display = LONG_COMMON_NAME; SHORTNAME, DisplayName and the consumer name are
  designations; each linguistic variant is a designation in its language (e.g. `zh-CN`),
  its long name or, when the variant has none, its fully specified name;
- properties as LOINC's own FHIR representation names them: COMPONENT, PROPERTY,
  TIME_ASPCT, SYSTEM, SCALE_TYP, METHOD_TYP, CLASS (Codings of parts), STATUS,
  CLASSTYPE, ORDER_OBS, EXAMPLE_UCUM_UNITS, answer-list;
- DEPRECATED terms are inactive.

The release's NOTICE is the licence text; the CodeSystem's `copyright` repeats LOINC's
required notice. Concepts are bulk-loaded into MongoDB (common.bulk_code_system).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.store.database import Store
from terminology.concepts import Concept, close_hierarchy
from terminology.loaders.common import LoadResult, Progress, bulk_code_system, no_progress

LOINC = "http://loinc.org"
COPYRIGHT = (
    "This material contains content from LOINC (http://loinc.org). LOINC is copyright "
    "Regenstrief Institute, Inc. and the Logical Observation Identifiers Names and Codes (LOINC) "
    "Committee and is available at no cost under the license at http://loinc.org/license. "
    "LOINC is a registered United States trademark of Regenstrief Institute, Inc."
)
PART_PROPERTIES = ("COMPONENT", "PROPERTY", "TIME_ASPCT", "SYSTEM", "SCALE_TYP", "METHOD_TYP", "CLASS")
STRING_PROPERTIES = ("STATUS", "CLASSTYPE", "ORDER_OBS", "EXAMPLE_UCUM_UNITS")
FSN_PARTS = ("COMPONENT", "PROPERTY", "TIME_ASPCT", "SYSTEM", "SCALE_TYP", "METHOD_TYP")


class LoincReleaseError(ValueError):
    """The folder is not a LOINC release (a required file is missing or malformed)."""


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _optional(path: Path) -> list[dict[str, str]]:
    return _rows(path) if path.is_file() else []


def _designation(value: str, use: str | None = None, language: str | None = None) -> dict[str, Any]:
    designation: dict[str, Any] = {}
    if language:
        designation["language"] = language
    if use:
        designation["use"] = {"system": LOINC, "code": use, "display": use}
    designation["value"] = value
    return designation


def read_release(folder: Path) -> tuple[dict[str, Any], list[Concept]]:
    """The CodeSystem header and all concepts of a LOINC release folder."""
    table = folder / "LoincTable" / "Loinc.csv"
    if not table.is_file():
        raise LoincReleaseError(f"{folder} is not a LOINC release: LoincTable/Loinc.csv is missing")
    terms = _rows(table)
    if not terms or "LOINC_NUM" not in terms[0] or "LONG_COMMON_NAME" not in terms[0]:
        raise LoincReleaseError(f"{table} has no LOINC_NUM/LONG_COMMON_NAME columns")
    accessory = folder / "AccessoryFiles"
    concepts: dict[str, Concept] = {}

    for part in _optional(accessory / "PartFile" / "Part.csv"):
        code = part["PartNumber"]
        concepts[code] = Concept(
            code, part.get("PartDisplayName") or part.get("PartName"),
            properties=[{"code": "PartTypeName", "valueString": part.get("PartTypeName", "")}],
            inactive=part.get("Status", "ACTIVE") == "DEPRECATED",
            status=part.get("Status"),
        )

    parts_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for link in _optional(accessory / "PartFile" / "LoincPartLink_Primary.csv"):
        prop = link.get("Property", "").rsplit("/", 1)[-1] or link.get("PartTypeName", "")
        parts_of[link["LoincNumber"]].append(
            {"code": prop, "valueCoding": {"system": LOINC, "code": link["PartNumber"], "display": link["PartName"]}}
        )
    consumer = {r["LoincNumber"]: r["ConsumerName"] for r in _optional(accessory / "ConsumerName" / "ConsumerName.csv")}

    for term in terms:
        code = term["LOINC_NUM"]
        properties = list(parts_of.get(code, []))
        linked = {p["code"] for p in properties}
        properties += [{"code": p, "valueString": term[p]} for p in PART_PROPERTIES if term.get(p) and p not in linked]
        properties += [{"code": p, "valueString": term[p]} for p in STRING_PROPERTIES if term.get(p)]
        designations = [_designation(term[c], c) for c in ("SHORTNAME", "DisplayName") if term.get(c)]
        if consumer.get(code) or term.get("CONSUMER_NAME"):
            designations.append(_designation(consumer.get(code) or term["CONSUMER_NAME"], "CONSUMER_NAME"))
        concepts[code] = Concept(
            code, term["LONG_COMMON_NAME"] or term.get("DisplayName"), term.get("DefinitionDescription") or None,
            designations=designations, properties=properties,
            inactive=term.get("STATUS") == "DEPRECATED", status=term.get("STATUS"),
        )

    for answer in _optional(accessory / "AnswerFile" / "AnswerList.csv"):
        list_code, answer_code = answer["AnswerListId"], answer.get("AnswerStringId")
        if list_code not in concepts:
            concepts[list_code] = Concept(list_code, answer.get("AnswerListName"))
        if answer_code and answer_code not in concepts:
            concepts[answer_code] = Concept(answer_code, answer.get("DisplayText"))
        if answer_code:
            concepts[list_code].properties.append({"code": "answer", "valueCoding": {"system": LOINC, "code": answer_code}})
    for link in _optional(accessory / "AnswerFile" / "LoincAnswerListLink.csv"):
        term = concepts.get(link["LoincNumber"])
        if term is not None:
            term.properties.append({"code": "answer-list", "valueCoding": {"system": LOINC, "code": link["AnswerListId"]}})

    for row in _optional(accessory / "ComponentHierarchyBySystem" / "ComponentHierarchyBySystem.csv"):
        code, parent = row["CODE"], row.get("IMMEDIATE_PARENT")
        if code not in concepts:
            concepts[code] = Concept(code, row.get("CODE_TEXT"))
        if parent and parent != code and parent not in concepts[code].parents:
            concepts[code].parents.append(parent)

    _linguistic_variants(accessory / "LinguisticVariants", concepts)
    for order, concept in enumerate(concepts.values()):
        concept.order = order
        concept.properties += [{"code": "parent", "valueCoding": {"system": LOINC, "code": p}} for p in concept.parents]
    close_hierarchy(concepts)
    version = max((t.get("VersionLastChanged") or "" for t in terms), default="") or None
    header: dict[str, Any] = {
        "resourceType": "CodeSystem",
        "id": "loinc",
        "url": LOINC,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.16.840.1.113883.6.1"}],
        "name": "LOINC",
        "title": "Logical Observation Identifiers, Names and Codes (LOINC)",
        "status": "active",
        "publisher": "Regenstrief Institute, Inc.",
        "copyright": COPYRIGHT,
        "caseSensitive": False,
        "hierarchyMeaning": "is-a",
        "content": "complete",
        "property": [
            *({"code": p, "uri": f"{LOINC}/property/{p}", "type": "Coding"} for p in PART_PROPERTIES),
            *({"code": p, "uri": f"{LOINC}/property/{p}", "type": "string"} for p in STRING_PROPERTIES),
            {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent", "type": "Coding"},
            {"code": "answer-list", "uri": f"{LOINC}/property/answer-list", "type": "Coding"},
        ],
    }
    if version:
        header["version"] = version
    return header, list(concepts.values())


def _linguistic_variants(folder: Path, concepts: dict[str, Concept]) -> None:
    """Each variant file's names as designations in its language (`zh-CN`, `de-DE`, ...)."""
    for variant in _optional(folder / "LinguisticVariants.csv"):
        language = f"{variant['ISO_LANGUAGE']}-{variant['ISO_COUNTRY']}"
        path = folder / f"{variant['ISO_LANGUAGE']}{variant['ISO_COUNTRY']}{variant['ID']}LinguisticVariant.csv"
        for row in _optional(path):
            concept = concepts.get(row.get("LOINC_NUM", ""))
            if concept is None:
                continue
            name = row.get("LONG_COMMON_NAME") or row.get("LinguisticVariantDisplayName")
            if not name:
                name = ":".join(row[p] for p in FSN_PARTS if row.get(p, "").strip())
            if name.strip(":"):
                concept.designations.append(_designation(name, None, language))


async def load_loinc(store: Store, folder: Path, progress: Progress = no_progress) -> LoadResult:
    header, concepts = read_release(folder)
    return await bulk_code_system(store, header, concepts, len(concepts), progress)
