"""A small tagged data set for search tests, loaded once per session over HTTP.

Every resource carries the tag `urn:kuroshio-test|<run>` and every query of the tests
adds `_tag=...`, so the tests see only their own data in the shared test database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import LiveServer
from tests.fhir.helpers import FHIR_JSON

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


@dataclass
class DataSet:
    tag: str
    ids: dict[str, str]  # local name -> id

    def __getitem__(self, name: str) -> str:
        return self.ids[name]


def _resources(tag: dict[str, str]) -> dict[str, dict]:
    meta = {"tag": [tag]}
    return {
        "pr1": {"resourceType": "Practitioner", "meta": meta, "name": [{"family": "Welby", "given": ["Marcus"]}]},
        "p1": {
            "resourceType": "Patient", "meta": {**meta, "profile": ["http://example.org/StructureDefinition/vip"],
                                                "security": [{"system": "urn:sec", "code": "R"}], "source": "urn:source:lab"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Peter the gardener</div>"},
            "active": True,
            "identifier": [{"system": "urn:x", "value": "A1", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "name": [{"family": "Müller", "given": ["Peter", "Hans"]}],
            "telecom": [{"system": "phone", "value": "555-0100"}],
            "gender": "male", "birthDate": "1970-03-04",
            "address": [{"city": "Zürich", "line": ["Bahnhofstrasse 1"]}],
            "generalPractitioner": [{"reference": "urn:uuid:pr1"}],
        },
        "p2": {
            "resourceType": "Patient", "meta": meta, "identifier": [{"system": "urn:x", "value": "A2"}],
            "name": [{"family": "Smith", "given": ["Anna"]}], "gender": "female", "birthDate": "1980",
            "deceasedBoolean": False,
        },
        "p3": {
            "resourceType": "Patient", "meta": meta, "identifier": [{"system": "urn:x", "value": "A3"}],
            "name": [{"family": "Smithson", "given": ["John"]}], "gender": "male", "birthDate": "1990-06",
            "deceasedDateTime": "2020-01-01",
        },
        "o1": {
            "resourceType": "Observation", "meta": meta, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose [Mass/volume] in Serum or Plasma"}]},
            "subject": {"reference": "urn:uuid:p1"}, "encounter": {"reference": "urn:uuid:e1"},
            "effectiveDateTime": "2020-01-02T10:00:00Z",
            "valueQuantity": {"value": 1.5, "unit": "g/L", "system": UCUM, "code": "g/L"},
        },
        "o2": {
            "resourceType": "Observation", "meta": meta, "status": "amended",
            "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
            "subject": {"reference": "urn:uuid:p1"},
            "effectivePeriod": {"start": "2020-02-01", "end": "2020-02-03"},
            "valueQuantity": {"value": 100, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
        },
        "o3": {
            "resourceType": "Observation", "meta": meta, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}], "text": "Heart rate"},
            "subject": {"reference": "urn:uuid:p2"}, "effectiveDateTime": "2019",
            "valueQuantity": {"value": 99.5, "unit": "/min", "system": UCUM, "code": "/min"},
            "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                           "valueQuantity": {"value": 120, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}],
        },
        "o4": {
            "resourceType": "Observation", "meta": meta, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "subject": {"reference": "urn:uuid:p3", "identifier": {"system": "urn:x", "value": "A3"}},
            "valueQuantity": {"value": 100.6, "unit": "/min", "system": UCUM, "code": "/min"},
        },
        "e1": {
            "resourceType": "Encounter", "meta": meta, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "urn:uuid:p1"}, "period": {"start": "2020-01-01", "end": "2020-01-05"},
            "participant": [{"individual": {"reference": "urn:uuid:pr1"}}],
        },
        "e2": {
            "resourceType": "Encounter", "meta": meta, "status": "planned",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "urn:uuid:p2"},
        },
        "l1": {
            "resourceType": "List", "meta": meta, "status": "current", "mode": "working",
            "entry": [{"item": {"reference": "urn:uuid:o1"}}, {"item": {"reference": "urn:uuid:o3"}}],
        },
        "ra1": {
            "resourceType": "RiskAssessment", "meta": meta, "status": "final", "subject": {"reference": "urn:uuid:p1"},
            "prediction": [{"probabilityDecimal": 0.8}],
        },
        "vs1": {
            "resourceType": "ValueSet", "meta": meta, "status": "active", "url": "http://example.org/fhir/ValueSet/abc/def",
        },
    }


def load(client: httpx.Client, resources: dict[str, dict]) -> dict[str, str]:
    entries = [
        {"fullUrl": f"urn:uuid:{name}", "resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
        for name, resource in resources.items()
    ]
    response = client.post(str(client.base_url).rstrip("/"), json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    ids = {}
    for name, entry in zip(resources, response.json()["entry"], strict=True):
        ids[name] = entry["response"]["location"].split("/")[1]
    return ids


@pytest.fixture(scope="session")
def dataset(server: LiveServer) -> Iterator[DataSet]:
    run = uuid.uuid4().hex[:12]
    tag = {"system": "urn:kuroshio-test", "code": run}
    with httpx.Client(base_url=server.fhir + "/", timeout=60) as client:
        ids = load(client, _resources(tag))
    yield DataSet(f"urn:kuroshio-test|{run}", ids)
