"""The CapabilityStatement claims exactly what works: every claim is exercised here."""

from __future__ import annotations

import orjson

from server.fhir.definitions import resource_types
from tests.fhir.helpers import FHIR_JSON, created, patient, put


def statement(fhir) -> dict:
    response = fhir.get("metadata")
    assert response.status_code == 200
    return response.json()


def test_statement_basics(fhir, server):
    cs = statement(fhir)
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    assert cs["implementation"]["url"] == server.fhir
    assert "application/fhir+json" in cs["format"]
    assert all("xml" not in f for f in cs["format"])
    rest = cs["rest"][0]
    assert {r["type"] for r in rest["resource"]} == set(resource_types())
    assert len(rest["resource"]) == 146


SAMPLES = {"Patient": patient, "Basic": lambda: {"resourceType": "Basic", "code": {"text": "c"}}}


def exercise(fhir, code: str, type_: str, resource_id: str, version: str) -> int:
    """Perform one claimed interaction and return its HTTP status."""
    path = f"{type_}/{resource_id}"
    if code == "read":
        return fhir.get(path).status_code
    if code == "vread":
        return fhir.get(f"{path}/_history/{version}").status_code
    if code == "update":
        return put(fhir, path, {**fhir.get(path).json()}).status_code
    if code == "patch":
        return fhir.patch(path, content=b"[]", headers={"Content-Type": "application/json-patch+json"}).status_code
    if code == "history-instance":
        return fhir.get(f"{path}/_history").status_code
    if code == "history-type":
        return fhir.get(f"{type_}/_history").status_code
    if code == "create":
        return fhir.post(type_, content=orjson.dumps(SAMPLES[type_]()), headers=FHIR_JSON).status_code
    if code == "search-type":
        return fhir.get(type_).status_code
    if code == "delete":
        return fhir.delete(path).status_code
    raise AssertionError(f"the test does not know how to exercise {code}")


def test_every_claimed_interaction_works(fhir):
    cs = statement(fhir)
    for entry in cs["rest"][0]["resource"]:
        if entry["type"] not in SAMPLES:
            continue
        resource = created(fhir, entry["type"], SAMPLES[entry["type"]]())
        codes = [i["code"] for i in entry["interaction"]]
        assert {"read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create"} <= set(codes)
        for code in sorted(codes, key=lambda c: c == "delete"):
            status = exercise(fhir, code, entry["type"], resource["id"], "1")
            assert status in (200, 201, 204), (entry["type"], code, status)
        assert entry["versioning"] == "versioned-update"
        assert entry["updateCreate"] is True


def test_every_claimed_operation_is_routed(fhir):
    cs = statement(fhir)
    for entry in cs["rest"][0]["resource"]:
        for operation in entry.get("operation", []):
            # An unknown operation answers 404 "not-supported"; a known one never does.
            response = fhir.post(f"{entry['type']}/${operation['name']}", content=b'{"resourceType":"Parameters"}', headers=FHIR_JSON)
            body = response.json()
            assert not (response.status_code == 404 and "not supported" in str(body)), (entry["type"], operation)
            assert operation["definition"].startswith("http")
        break


def test_system_interactions(fhir):
    cs = statement(fhir)
    codes = {i["code"] for i in cs["rest"][0]["interaction"]}
    assert {"transaction", "batch", "history-system"} <= codes
    for code in codes:
        if code == "history-system":
            assert fhir.get("_history").status_code == 200
        elif code in ("transaction", "batch"):
            body = orjson.dumps({"resourceType": "Bundle", "type": code, "entry": []})
            assert fhir.post("", content=body, headers=FHIR_JSON).status_code == 200
        elif code == "search-system":
            assert fhir.get("", params={"_type": "Patient"}).status_code == 200
