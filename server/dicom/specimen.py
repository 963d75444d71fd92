"""The FHIR bridge for slides: each specimen a stored whole slide image names becomes an R4
`Specimen` of the study's Patient, referenced from the ImagingStudy series that imaged it
(`ImagingStudy.series.specimen`).

The specimens come from the Specimen module as recorded at ingest (wsi.specimen_of): one
Specimen per item of the Specimen Description Sequence with a known Specimen Identifier
(identifier = that identifier, issuer as its system; the Specimen UID as a second
identifier; type from the Specimen Type Code Sequence; container = the slide's Container
Identifier), or, when no item has one, one Specimen identified by the Container Identifier.
"Unknown", which wsidicom writes for identifiers it was not given, is no identifier.

Like the Patient, a Specimen is found by its (first) identifier with a conditional create:
one the laboratory system already registered is referenced as it is, a new one is created
only when none has the identifier, and when several have it the series references the
specimen by identifier only.
"""

from __future__ import annotations

from typing import Any

from server.dicom.imaging_study import Reference, find_or_create, patient_identifier
from server.fhir.interactions import Resource
from server.store.fhir import FhirStore

Json = dict[str, Any]
SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org"}


def _identifier(recorded: Json) -> dict[str, str]:
    """A FHIR Identifier from a recorded DICOM identifier and its issuer."""
    return patient_identifier(recorded["value"], recorded.get("issuer")) or {"value": recorded["value"]}


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


def specimens(recorded: Json, subject: Reference) -> list[Resource]:
    """The Specimen resources a slide's recorded Specimen module describes."""
    container = recorded.get("container")
    described = recorded.get("specimens") or ([container] if container else [])
    resources = []
    for item in described:
        identifier = _identifier(item)
        resource: Resource = {
            "resourceType": "Specimen",
            "identifier": [identifier],
            "subject": subject,
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


async def reflect_series(db: FhirStore, fhir_base: str, instance_docs: list[Json], subject: Reference) -> list[Reference]:
    """Find or create the Specimens named by a series' slide instances; the series' references."""
    references: list[Reference] = []
    seen: list[dict[str, str]] = []
    for doc in instance_docs:
        recorded = (doc.get("wsi") or {}).get("specimen")
        for resource in specimens(recorded, subject) if recorded else []:
            identifier = resource["identifier"][0]
            if identifier not in seen:
                seen.append(identifier)
                references.append(await find_or_create(db, fhir_base, resource, identifier))
    return references
