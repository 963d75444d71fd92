"""The FHIR bridge: each stored study reflected as an R4 ImagingStudy of a Patient.

It goes through the FHIR service functions (`interactions.read/update/delete`), as any
client would, never the FHIR collections. Reflection is asynchronous to ingest: the index
marks a study (`fhir` flag, set in the ingest transaction, so a crash cannot lose it) and
`Reflector` brings the ImagingStudy up to date shortly after, many arrivals collapsing into
one update. That keeps FHIR validation of a large ImagingStudy off the C-STORE/STOW path.

Resource ids are deterministic so that concurrent arrivals (several processes, STOW and
C-STORE at once) converge on one resource: the ImagingStudy's id is the Study Instance UID
(a valid FHIR id), the Patient's is derived from PatientID + IssuerOfPatientID. The Patient
is looked up with `find_patient_by_identifier`; when FHIR search by identifier exists,
that function is the one place to change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any
from urllib.parse import quote

from server.dicom import qido
from server.dicom.archive import Archive
from server.fhir import interactions
from server.fhir.interactions import Resource
from server.fhir.outcome import FhirError
from server.store.fhir import FhirStore

log = logging.getLogger("kuroshio.dicom.fhir")
POLL_SECONDS = 2.0
# After a change, wait this long before reflecting, so that a burst of arrivals (a study
# being sent instance by instance) costs one ImagingStudy update, not one per instance.
DEBOUNCE_SECONDS = 1.0


def patient_identifier(patient_id: str | None, issuer: str | None) -> dict[str, str] | None:
    patient_id = (patient_id or "").strip()
    issuer = (issuer or "").strip()
    if not patient_id:
        return None
    identifier = {"value": patient_id}
    if issuer:
        if all(part.isdigit() for part in issuer.split(".")):
            identifier["system"] = f"urn:oid:{issuer}"
        elif ":" in issuer:
            identifier["system"] = issuer
        else:
            identifier["system"] = f"urn:kuroshio:dicom-issuer:{quote(issuer, safe='')}"
    return identifier


def patient_id_for(identifier: dict[str, str] | None, study: str) -> str:
    """The deterministic FHIR id of the Patient with this identifier (or of a study's
    anonymous patient when the study has no PatientID)."""
    basis = f"{identifier.get('system', '')}|{identifier['value']}" if identifier else f"study|{study}"
    return "dicom-" + hashlib.sha256(basis.encode()).hexdigest()[:40]


async def find_patient_by_identifier(db: FhirStore, identifier: dict[str, str] | None, study: str) -> str | None:
    """The id of the Patient with this identifier, or None.

    Until FHIR search by identifier exists this reads the deterministic id; replace the
    body with a search (`Patient?identifier=system|value`) once search lands.
    """
    candidate = patient_id_for(identifier, study)
    try:
        await interactions.read(db, "Patient", candidate)
    except FhirError:
        return None
    return candidate


async def ensure_patient(db: FhirStore, study_json: qido.Json, study: str) -> str:
    identifier = patient_identifier(_first(study_json, "PatientID"), _first(study_json, "IssuerOfPatientID"))
    found = await find_patient_by_identifier(db, identifier, study)
    if found is not None:
        return found
    patient_id = patient_id_for(identifier, study)
    patient: Resource = {"resourceType": "Patient", "id": patient_id}
    if identifier:
        patient["identifier"] = [identifier]
    name = _first(study_json, "PatientName")
    if isinstance(name, dict) and name.get("Alphabetic"):
        family, _, rest = name["Alphabetic"].partition("^")
        family = family.strip()
        given = [g.strip() for g in rest.split("^")[:2] if g.strip()]
        human: dict[str, Any] = {}
        text = " ".join(given + [family]).strip()
        if text:
            human["text"] = text
        if family:
            human["family"] = family
        if given:
            human["given"] = given
        if human:
            patient["name"] = [human]
    sex = {"M": "male", "F": "female", "O": "other"}.get(str(_first(study_json, "PatientSex") or ""))
    if sex:
        patient["gender"] = sex
    birth = _date(_first(study_json, "PatientBirthDate"))
    if birth:
        patient["birthDate"] = birth
    await interactions.update(db, "Patient", patient_id, patient, None)
    return patient_id


async def reflect(archive: Archive, db: FhirStore, study: str, dicomweb_base: str) -> None:
    """Create, update or delete the ImagingStudy of one study from the index."""
    doc = await archive.index.study(study)
    if doc is None:
        try:
            await interactions.delete(db, "ImagingStudy", study, None)
        except FhirError:
            pass
        return
    from server.dicom import specimen  # builds on this module's identifiers

    series_docs = await archive.index.find("series", {"st": study}, sort=[("k.SeriesNumber", 1), ("_id", 1)])
    instance_docs = await archive.index.find(
        "instance", {"st": study}, {"se": 1, "k": 1, "wsi.specimen": 1},
        sort=[("se", 1), ("k.InstanceNumber", 1), ("_id", 1)],
    )
    patient_id = await ensure_patient(db, doc.get("j", {}), study)
    resource = imaging_study(doc, series_docs, instance_docs, patient_id, dicomweb_base)
    for series in resource["series"]:  # whole slide images: the Specimens they imaged
        members = [d for d in instance_docs if d["se"] == series["uid"]]
        references = await specimen.reflect_series(db, members, patient_id)
        if references:
            series["specimen"] = references
    await interactions.update(db, "ImagingStudy", study, resource, None)


def imaging_study(
    study: qido.Json, series_docs: list[qido.Json], instance_docs: list[qido.Json], patient_id: str, base: str
) -> Resource:
    attributes = study.get("j", {})
    by_series: dict[str, list[qido.Json]] = {}
    for doc in instance_docs:
        by_series.setdefault(doc["se"], []).append(doc)
    resource: Resource = {
        "resourceType": "ImagingStudy",
        "id": study["_id"],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study['_id']}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "endpoint": [{"reference": "#dicomweb"}],
        "numberOfSeries": len(series_docs),
        "numberOfInstances": len(instance_docs),
        "contained": [{
            "resourceType": "Endpoint",
            "id": "dicomweb",
            "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": base,
        }],
    }
    modalities = study.get("k", {}).get("ModalitiesInStudy", [])
    if modalities:
        resource["modality"] = [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": m} for m in modalities]
    started = _datetime(_first(attributes, "StudyDate"), _first(attributes, "StudyTime"))
    if started:
        resource["started"] = started
    description = _first(attributes, "StudyDescription")
    if description:
        resource["description"] = description
    accession = _first(attributes, "AccessionNumber")
    if accession:
        resource["identifier"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession,
        })
    resource["series"] = [_series(doc, by_series.get(doc["_id"], [])) for doc in series_docs]
    return resource


def _series(doc: qido.Json, instances: list[qido.Json]) -> Resource:
    attributes = doc.get("j", {})
    series: Resource = {
        "uid": doc["_id"],
        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": _first(attributes, "Modality") or "OT"},
        "numberOfInstances": len(instances),
    }
    number = doc.get("k", {}).get("SeriesNumber")
    if number is not None and 0 <= number < 2**31:
        series["number"] = number
    description = _first(attributes, "SeriesDescription")
    if description:
        series["description"] = description
    series["instance"] = []
    for instance in instances:
        entry: Resource = {
            "uid": instance["_id"],
            "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{instance['k'].get('SOPClassUID', '')}"},
        }
        number = instance["k"].get("InstanceNumber")
        if number is not None and 0 <= number < 2**31:
            entry["number"] = number
        series["instance"].append(entry)
    return series


def _first(attributes: qido.Json, keyword: str) -> Any:
    """The first value, None when absent or blank (FHIR strings may not be empty)."""
    element = attributes.get(qido.TAGS[keyword]) or {}
    values = element.get("Value")
    value = values[0] if values else None
    if isinstance(value, str):
        value = value.strip() or None
    return value


def _date(value: Any) -> str | None:
    text = str(value or "")
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return None


def _datetime(date: Any, time: Any) -> str | None:
    day = _date(date)
    if not day:
        return None
    text = str(time or "").split(".")[0]
    if len(text) >= 4 and text.isdigit():
        seconds = text[4:6] or "00"
        return f"{day}T{text[:2]}:{text[2:4]}:{seconds}Z"
    return day


class Reflector:
    """Keeps ImagingStudy resources in step with the index, in the background."""

    def __init__(self, archive: Archive, db: FhirStore, dicomweb_base: str) -> None:
        self.archive = archive
        self.db = db
        self.base = dicomweb_base
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        archive.listeners.append(self.wake.set)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.wake.clear()
            try:
                await self.reflect_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reflecting studies as ImagingStudy failed; retrying later")

    async def reflect_pending(self) -> None:
        while True:
            pending = await self.archive.index.studies_to_reflect()
            if not pending:
                return
            for doc in pending:
                await reflect(self.archive, self.db, doc["_id"], self.base)
                await self.archive.index.reflected(doc["_id"], doc["rev"])
