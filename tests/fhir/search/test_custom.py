"""Custom SearchParameter resources, $reindex, and $meta at type and system level."""

from __future__ import annotations

import time
import uuid

from server.fhir.search.custom import REFRESH_SECONDS
from tests.fhir.helpers import FHIR_JSON


def _patients(fhir, code: str, value: str) -> set[str]:
    response = fhir.get("Patient", params={code: value})
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", [])}


def test_custom_search_parameter_and_reindex(fhir):
    run = uuid.uuid4().hex[:8]
    url, code = f"http://example.org/eye-colour-{run}", f"eye-colour-{run}"
    patient = {"resourceType": "Patient", "extension": [{"url": url, "valueString": "blue"}]}
    before = fhir.post("Patient", json=patient, headers=FHIR_JSON).json()["id"]
    definition = {
        "resourceType": "SearchParameter", "url": f"http://example.org/SearchParameter/{code}", "name": code,
        "status": "active", "description": "eye colour", "code": code, "base": ["Patient"], "type": "token",
        "expression": f"Patient.extension('{url}').value",
    }
    assert fhir.post("SearchParameter", json=definition, headers=FHIR_JSON).status_code == 201
    time.sleep(REFRESH_SECONDS + 1)  # the other worker processes load it at their next refresh
    after = fhir.post("Patient", json=patient, headers=FHIR_JSON).json()["id"]
    assert _patients(fhir, code, "blue") == {after}  # new writes use it
    reindexed = fhir.post("Patient/$reindex", json={"resourceType": "Parameters"}, headers=FHIR_JSON)
    assert reindexed.status_code == 200, reindexed.text
    assert reindexed.json()["parameter"][0]["valueInteger"] >= 2
    assert _patients(fhir, code, "blue") == {before, after}
    assert _patients(fhir, code, "green") == set()
    statement = fhir.get("metadata").json()  # the statement is built at start-up
    assert statement["resourceType"] == "CapabilityStatement"
    assert fhir.get("Patient/$reindex").status_code == 405  # changes data: POST only


def test_unusable_custom_parameter_is_stored_but_not_used(fhir, server):
    """It is refused for search, and each server process says why in its log once, not
    at every refresh nor at every write. `Patient.name.where((((` is one that fhirpathpy
    compiles (its parser recovers from syntax errors) and then failed on every Patient
    with a name, with a traceback in the log each time."""
    definitions = {}
    for expression in ("Patient.nonsense((", "Patient.name.where((((", "Patient.name.family.substring('x')"):
        code = f"broken-{uuid.uuid4().hex[:8]}"
        definition = {
            "resourceType": "SearchParameter", "url": f"http://example.org/SearchParameter/{code}", "name": code,
            "status": "active", "description": "broken", "code": code, "base": ["Patient"], "type": "token",
            "expression": expression,
        }
        created = fhir.post("SearchParameter", json=definition, headers=FHIR_JSON)
        assert created.status_code == 201
        definitions[code] = created.json()
    time.sleep(REFRESH_SECONDS + 1)  # every process has read them
    for _ in range(4):
        patient = {"resourceType": "Patient", "name": [{"family": "Broken", "given": ["Expression"]}]}
        assert fhir.post("Patient", json=patient, headers=FHIR_JSON).status_code == 201
    *unusable, failing = definitions.items()
    for code, _ in unusable:
        assert fhir.get("Patient", params={code: "x"}).status_code == 400  # unknown parameter
    time.sleep(REFRESH_SECONDS + 1)
    log = server.log_path.read_text().splitlines()
    for code, created in unusable:
        said = f"SearchParameter {created['id']} is not used for search"
        processes = [line.split()[3] for line in log if said in line]
        assert processes and len(processes) == len(set(processes)), processes
        assert not [line for line in log if f"custom search parameter {created['url']} failed" in line]
    # valid FHIRPath that fails on some resources only (substring takes a number): used,
    # matching nothing where it fails, and said once per process, not at every write
    code, created = failing
    assert _patients(fhir, code, "x") == set()
    processes = [line.split()[3] for line in log if f"custom search parameter {created['url']} failed" in line]
    assert processes and len(processes) == len(set(processes)), processes


def test_meta_at_type_and_system_level(fhir):
    tag = {"system": "urn:meta-test", "code": uuid.uuid4().hex}
    profile = f"http://example.org/StructureDefinition/{tag['code']}"
    # a tag with a system and no code is found by `_tag=urn:meta-test|` but names no tag
    system_only = {"system": "urn:meta-test-system-only"}
    resource = {"resourceType": "Basic", "meta": {"tag": [tag, system_only], "profile": [profile],
                                                  "security": [{"system": "urn:sec", "code": "N"}]},
                "code": {"text": "x"}}
    assert fhir.post("Basic", json=resource, headers=FHIR_JSON).status_code == 201
    for url in ("Basic/$meta", "$meta"):
        response = fhir.get(url)
        assert response.status_code == 200, response.text
        meta = response.json()["parameter"][0]["valueMeta"]
        assert tag in meta["tag"] and profile in meta["profile"] and {"system": "urn:sec", "code": "N"} in meta["security"]
        assert all(coding.get("code") for coding in meta["tag"] + meta["security"]), meta
    assert tag not in fhir.get("Patient/$meta").json()["parameter"][0]["valueMeta"].get("tag", [])
