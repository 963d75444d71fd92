"""The FHIR bridge: a stored study appears as an ImagingStudy of the Patient found by
identifier (or created), is updated as instances arrive, and follows deletes."""

from __future__ import annotations

import time

from pydicom.uid import generate_uid

from tests.dicom.conftest import ct_instance


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
