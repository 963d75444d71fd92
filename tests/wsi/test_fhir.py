"""The FHIR side of a stored slide: the Patient's ImagingStudy lists the slide series
(modality SM) and references a Specimen identified by the slide's specimen identifier."""

from __future__ import annotations

import time

import pytest


def _wait_for(fhir, path: str, check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        response = fhir.get(path)
        if response.status_code == 200 and check(response.json()):
            return response.json()
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never became as expected: {response.status_code} {response.text[:500]}")
        time.sleep(0.5)


def test_slide_in_imaging_study_with_specimen(fhir, stored_slides):
    stored = stored_slides["jpeg"]
    study = _wait_for(fhir, f"ImagingStudy/{stored.study}",
                      lambda r: any(s["uid"] == stored.series and "specimen" in s for s in r.get("series", [])))
    series = next(s for s in study["series"] if s["uid"] == stored.series)
    assert series["modality"]["code"] == "SM"
    assert series["numberOfInstances"] == len(stored.files)
    assert {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SM"} in study["modality"]
    assert len(series["specimen"]) == 1
    specimen = fhir.get(series["specimen"][0]["reference"]).json()
    assert specimen["resourceType"] == "Specimen"
    assert specimen["identifier"][0] == {"value": "SPEC-1"}
    assert specimen["identifier"][1]["system"] == "urn:dicom:uid"
    assert specimen["subject"] == study["subject"]
    assert specimen["container"][0]["identifier"] == [{"value": "SPEC-1"}]
    assert specimen["type"]["coding"][0]["system"] == "http://snomed.info/sct"
    patient = fhir.get(study["subject"]["reference"]).json()
    assert patient["identifier"] == [{"value": "WSI-PAT-1"}]


def test_slides_without_known_specimen_have_no_specimen(fhir, stored_slides):
    """wsidicomizer writes "Unknown" as identifier when it is given none: no Specimen."""
    stored = stored_slides["jpeg2000"]
    study = _wait_for(fhir, f"ImagingStudy/{stored.study}", lambda r: bool(r.get("series")))
    assert all("specimen" not in s for s in study["series"])
