"""The FHIR bridge for slides: each specimen a stored whole slide image names becomes an R4
`Specimen` of the study's Patient, referenced from the ImagingStudy series that imaged it
(`ImagingStudy.series.specimen`).

The specimens come from the Specimen module as recorded at ingest (wsi.specimen_of): one
Specimen per item of the Specimen Description Sequence with a known Specimen Identifier
(identifier = that identifier, issuer as its system; the Specimen UID as a second
identifier; type from the Specimen Type Code Sequence; container = the slide's Container
Identifier), or, when no item has one, one Specimen identified by the Container Identifier.
"Unknown", which wsidicom writes for identifiers it was not given, is no identifier.

Like the Patient, a Specimen gets a deterministic id derived from its identifier, so that
concurrent reflections converge on one resource; it is rewritten only when it changed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from server.dicom.imaging_study import patient_identifier
from server.fhir import interactions
from server.fhir.interactions import Resource
from server.fhir.outcome import FhirError
from server.store.fhir import FhirStore

Json = dict[str, Any]
SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org"}


def _identifier(recorded: Json) -> dict[str, str]:
    """A FHIR Identifier from a recorded DICOM identifier and its issuer."""
    return patient_identifier(recorded["value"], recorded.get("issuer")) or {"value": recorded["value"]}


def specimen_id(identifier: dict[str, str]) -> str:
    basis = f"{identifier.get('system', '')}|{identifier['value']}"
    return "dicom-specimen-" + hashlib.sha256(basis.encode()).hexdigest()[:32]


def _concept(code: Json | None) -> Json | None:
    if not code:
        return None
    coding: Json = {"code": code["code"]}
    system = SYSTEMS.get(code.get("scheme", ""))
    if system:
        coding["system"] = system
    if code.get("meaning"):
        coding["display"] = code["meaning"]
    return {"coding": [coding]}


def specimens(recorded: Json, patient: str) -> list[Resource]:
    """The Specimen resources a slide's recorded Specimen module describes."""
    container = recorded.get("container")
    described = recorded.get("specimens") or ([container] if container else [])
    resources = []
    for item in described:
        identifier = _identifier(item)
        resource: Resource = {
            "resourceType": "Specimen",
            "id": specimen_id(identifier),
            "identifier": [identifier],
            "subject": {"reference": f"Patient/{patient}"},
        }
        if item.get("uid"):
            resource["identifier"].append({"system": "urn:dicom:uid", "value": f"urn:oid:{item['uid']}"})
        kind = _concept(item.get("type"))
        if kind:
            resource["type"] = kind
        if container:
            entry: Json = {"identifier": [_identifier(container)]}
            container_type = _concept(recorded.get("container_type"))
            if container_type:
                entry["type"] = container_type
            resource["container"] = [entry]
        if item.get("description"):
            resource["note"] = [{"text": item["description"]}]
        resources.append(resource)
    return resources


async def ensure(db: FhirStore, resource: Resource) -> str:
    """Create or update a Specimen unless it is stored as it is; its id."""
    try:
        current = await interactions.read(db, "Specimen", resource["id"])
        stored = orjson.loads(current.body or b"{}")
        stored.pop("meta", None)
        if stored == resource:
            return resource["id"]
    except FhirError:
        pass
    await interactions.update(db, "Specimen", resource["id"], resource, None)
    return resource["id"]


async def reflect_series(db: FhirStore, instance_docs: list[Json], patient: str) -> list[Json]:
    """Ensure the Specimens named by a series' slide instances; the series' references."""
    ids: list[str] = []
    for doc in instance_docs:
        recorded = (doc.get("wsi") or {}).get("specimen")
        for resource in specimens(recorded, patient) if recorded else []:
            if resource["id"] not in ids:
                ids.append(await ensure(db, resource))
    return [{"reference": f"Specimen/{i}"} for i in ids]
