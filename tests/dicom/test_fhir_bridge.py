"""The FHIR bridge: a stored study appears as an ImagingStudy of the Patient found by
identifier (or created), is updated as instances arrive, and follows deletes."""

from __future__ import annotations

import time

from pydicom.uid import generate_uid

from tests.dicom.conftest import ct_instance
from tests.fhir.helpers import post


def wait_for(fhir, path, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        response = fhir.get(path)
        if predicate(response):
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {response.status_code} {response.text[:300]}")
        time.sleep(0.2)


def test_imaging_study_follows_the_archive(dicomweb, fhir):
    study, series = generate_uid(), generate_uid()
    patient_id = "BRIDGE-" + generate_uid()[-8:]
    first = [ct_instance(study, series, number=i, patient_id=patient_id, patient_name="Tanaka^Hana") for i in (1, 2)]
    first[0].IssuerOfPatientID = first[1].IssuerOfPatientID = "HOSP-A"
    dicomweb.store_instances(first)
    response = wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.status_code == 200 and r.json()["numberOfInstances"] == 2)
    resource = response.json()
    assert resource["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}
    assert resource["modality"][0]["code"] == "CT"
    assert resource["started"] == "2024-01-02T10:15:00Z"
    assert resource["series"][0]["uid"] == series and len(resource["series"][0]["instance"]) == 2
    assert resource["contained"][0]["address"].endswith("/dicomweb")
    patient = fhir.get(resource["subject"]["reference"]).json()
    assert patient["identifier"][0]["value"] == patient_id
    assert patient["name"][0]["family"] == "Tanaka"

    other_series = generate_uid()
    more = ct_instance(study, other_series, number=1, patient_id=patient_id, modality="MR")
    more.IssuerOfPatientID = "HOSP-A"
    dicomweb.store_instances([more])
    response = wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.json()["numberOfInstances"] == 3)
    assert response.json()["numberOfSeries"] == 2
    assert {m["code"] for m in response.json()["modality"]} == {"CT", "MR"}
    assert response.json()["subject"] == resource["subject"]  # the same Patient, found again

    dicomweb.delete_series(study, other_series)
    wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.json()["numberOfInstances"] == 2)
    dicomweb.delete_study(study)
    wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.status_code == 410)


def _patients(fhir, identifier: str) -> list[dict]:
    bundle = fhir.get("Patient", params={"identifier": identifier}).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def test_existing_patient_is_referenced_not_duplicated(dicomweb, fhir):
    """A Patient the EHR registered (PatientID + IssuerOfPatientID as identifier) is the
    ImagingStudy's subject; the bridge creates no second Patient."""
    patient_id = "EHR-" + generate_uid()[-8:]
    registered = post(fhir, "Patient", {
        "resourceType": "Patient", "name": [{"family": "Registered"}],
        "identifier": [{"system": "urn:oid:1.2.392.200119", "value": patient_id}],
    }).json()
    study = generate_uid()
    instance = ct_instance(study, patient_id=patient_id, patient_name="Other^Name")
    instance.IssuerOfPatientID = "1.2.392.200119"
    dicomweb.store_instances([instance])
    resource = wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.status_code == 200).json()
    assert resource["subject"] == {"reference": f"Patient/{registered['id']}"}
    assert [p["id"] for p in _patients(fhir, f"urn:oid:1.2.392.200119|{patient_id}")] == [registered["id"]]
    assert fhir.get(f"Patient/{registered['id']}").json()["name"][0]["family"] == "Registered"  # left as it was

    # Search escapes: a PatientID with the token separators, and no issuer (no system).
    odd = f"A|B,C$D{generate_uid()[-6:]}"
    other_study = generate_uid()
    dicomweb.store_instances([ct_instance(other_study, patient_id=odd)])
    subject = wait_for(fhir, f"ImagingStudy/{other_study}", lambda r: r.status_code == 200).json()["subject"]
    created = fhir.get(subject["reference"]).json()
    assert created["identifier"] == [{"value": odd}]
    again = generate_uid()
    dicomweb.store_instances([ct_instance(again, patient_id=odd)])
    assert wait_for(fhir, f"ImagingStudy/{again}", lambda r: r.status_code == 200).json()["subject"] == subject


def test_ambiguous_patient_is_referenced_by_identifier_only(dicomweb, fhir, server):
    """Two Patients with the identifier: the bridge does not pick one, nor add a third;
    its warning in the server log names the identifier's system, not the patient's id."""
    patient_id = "TWICE-" + generate_uid()[-8:]
    identifier = {"system": "urn:oid:1.2.392.200119", "value": patient_id}
    for _ in range(2):
        post(fhir, "Patient", {"resourceType": "Patient", "identifier": [identifier]})
    study = generate_uid()
    instance = ct_instance(study, patient_id=patient_id)
    instance.IssuerOfPatientID = "1.2.392.200119"
    dicomweb.store_instances([instance])
    resource = wait_for(fhir, f"ImagingStudy/{study}", lambda r: r.status_code == 200).json()
    assert resource["subject"] == {"type": "Patient", "identifier": identifier}
    assert len(_patients(fhir, f"urn:oid:1.2.392.200119|{patient_id}")) == 2
    log = server.log_path.read_text()
    assert "share an identifier of system 'urn:oid:1.2.392.200119'" in log
    assert patient_id not in log
