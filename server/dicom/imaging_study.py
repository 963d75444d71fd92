"""The FHIR bridge: each stored study reflected as an R4 ImagingStudy of a Patient.

It goes through the FHIR service functions (`interactions.read/update/delete`), as any
client would, never the FHIR collections. Reflection is asynchronous to ingest: the index
marks a study (`fhir` flag, set in the ingest transaction, so a crash cannot lose it) and
`Reflector` brings the ImagingStudy up to date shortly after, many arrivals collapsing into
one update. That keeps FHIR validation of a large ImagingStudy off the C-STORE/STOW path.

The Patient is found the way any client would find it: a conditional create
(`Patient?identifier=system|value`, the match and the create in one durable transaction,
so concurrent reflections of one patient's studies make one Patient). A Patient the EHR
already registered with that identifier is referenced, never duplicated. When several
Patients carry the identifier, the bridge does not guess: the ImagingStudy references the
patient by identifier only (a logical reference) and the ambiguity is logged. A study
without a PatientID gets its own anonymous Patient, whose id is derived from the Study
Instance UID. The ImagingStudy's id is the Study Instance UID (a valid FHIR id).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from server.dicom import qido
from server.dicom.archive import Archive
from server.fhir import interactions
from server.fhir.interactions import Resource
from server.fhir.outcome import FhirError
from server.fhir.search import conditional
from server.store.fhir import FhirStore

log = logging.getLogger("kuroshio.dicom.fhir")
POLL_SECONDS = 2.0
# A study is reflected once it has had no change for DEBOUNCE_SECONDS, and while it keeps
# changing, every MAX_DELAY_SECONDS: a study being sent instance by instance costs one
# ImagingStudy update (each rebuilds it from all its instances), not one per arrival.
DEBOUNCE_SECONDS = 1.0
MAX_DELAY_SECONDS = 10.0
Reference = dict[str, Any]


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


def anonymous_patient_id(study: str) -> str:
    """The FHIR id of the Patient of a study that has no PatientID."""
    return "dicom-" + hashlib.sha256(f"study|{study}".encode()).hexdigest()[:40]


def identifier_criteria(identifier: dict[str, str]) -> str:
    """`identifier=system|value` with the search escapes (a `|value` without system matches
    only identifiers that have no system, as the spec's token search says)."""

    def escaped(text: str) -> str:
        return "".join("\\" + c if c in "\\|,$" else c for c in text)

    return urlencode({"identifier": f"{escaped(identifier.get('system', ''))}|{escaped(identifier['value'])}"})


async def find_or_create(db: FhirStore, fhir_base: str, resource: Resource, identifier: dict[str, str]) -> Reference:
    """A reference to the one resource with this identifier, created from `resource` when
    none has it; with several, a logical reference by identifier (the bridge does not guess)."""
    type_ = resource["resourceType"]
    try:
        written = await conditional.create(db, fhir_base, type_, resource, identifier_criteria(identifier))
    except FhirError as exc:
        if exc.status != 412:  # 412: the criteria match more than one resource
            raise
        # the system only: the value is a patient identifier, which the log must not hold
        log.warning("several %s resources share an identifier of system %r; referencing it by identifier only",
                    type_, identifier.get("system"))
        return {"type": type_, "identifier": identifier}
    return {"reference": f"{type_}/{written.id}"}


def patient_resource(study_json: qido.Json, identifier: dict[str, str] | None) -> Resource:
    """The Patient a study's patient attributes describe."""
    patient: Resource = {"resourceType": "Patient"}
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
    return patient


async def ensure_patient(db: FhirStore, fhir_base: str, study_json: qido.Json, study: str) -> Reference:
    """The reference to the study's Patient, found by identifier or created."""
    identifier = patient_identifier(_first(study_json, "PatientID"), _first(study_json, "IssuerOfPatientID"))
    patient = patient_resource(study_json, identifier)
    if identifier:
        return await find_or_create(db, fhir_base, patient, identifier)
    patient_id = anonymous_patient_id(study)
    try:
        await interactions.read(db, "Patient", patient_id)
    except FhirError:
        await interactions.update(db, "Patient", patient_id, {**patient, "id": patient_id}, None)
    return {"reference": f"Patient/{patient_id}"}


async def reflect(archive: Archive, db: FhirStore, study: str, dicomweb_base: str, fhir_base: str) -> None:
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
    subject = await ensure_patient(db, fhir_base, doc.get("j", {}), study)
    resource = imaging_study(doc, series_docs, instance_docs, subject, dicomweb_base)
    for series in resource["series"]:  # whole slide images: the Specimens they imaged
        members = [d for d in instance_docs if d["se"] == series["uid"]]
        references = await specimen.reflect_series(db, fhir_base, members, subject)
        if references:
            series["specimen"] = references
    await interactions.update(db, "ImagingStudy", study, resource, None)


def imaging_study(
    study: qido.Json, series_docs: list[qido.Json], instance_docs: list[qido.Json], subject: Reference, base: str
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
        "subject": subject,
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

    def __init__(self, archive: Archive, db: FhirStore, dicomweb_base: str, fhir_base: str) -> None:
        self.archive = archive
        self.db = db
        self.base = dicomweb_base
        self.fhir_base = fhir_base
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
            self.wake.clear()
            await asyncio.sleep(DEBOUNCE_SECONDS)
            try:
                await self.reflect_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reflecting studies as ImagingStudy failed; retrying later")

    async def reflect_pending(self) -> None:
        """One pass over the studies due (the next pass takes any left). Every server
        process runs one, whichever process changed a study: one pass each, not a loop
        that chases a study still receiving instances."""
        now = datetime.now(UTC)
        due = await self.archive.index.studies_to_reflect(
            now - timedelta(seconds=DEBOUNCE_SECONDS), now - timedelta(seconds=MAX_DELAY_SECONDS)
        )
        for doc in due:
            await reflect(self.archive, self.db, doc["_id"], self.base, self.fhir_base)
            await self.archive.index.reflected(doc["_id"], doc["rev"], datetime.now(UTC))
