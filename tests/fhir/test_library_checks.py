"""fhir.resources checks of large transactions, in a worker process: the same verdicts as
in-process, at the right entry, and a large transaction is all-or-nothing."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from server.fhir import library_checks
from server.fhir.library_checks import CHUNK, LibraryChecks
from tests.fhir.helpers import FHIR_JSON, assert_outcome


def _patients(count: int, broken_at: int) -> list[tuple[bytes, dict]]:
    """Patients, one with a birthDate fhir.resources refuses (the R4 validator is
    bypassed here: it would refuse it first)."""
    resources = []
    for i in range(count):
        resource = {"resourceType": "Patient", "id": f"p{i}", "birthDate": "1970-01-01"}
        if i == broken_at:
            resource["birthDate"] = "the seventies"
        resources.append((orjson.dumps(resource), resource))
    return resources


@pytest.mark.parametrize("workers", [1, 0])
def test_worker_and_in_process_checks_agree(workers):
    library_checks.configure(workers)
    try:
        checks = LibraryChecks()
        for index, (body, resource) in enumerate(_patients(2 * CHUNK + 5, broken_at=CHUNK + 3)):
            checks.add(index, body, resource)
        problems = asyncio.run(checks.problems())
        handed_over = [chunk.future is not None for chunk in checks.chunks]
    finally:
        library_checks.configure(0)
    assert handed_over == ([True, True, False] if workers else [False])
    assert [index for index, _ in problems] == [CHUNK + 3]
    assert problems[0][1][0].expression == ("Patient.birthDate",)


def test_large_transaction_is_checked_and_atomic(fhir):
    marker = uuid.uuid4().hex
    entries = [
        {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": f"{marker}-{i}"}]},
         "request": {"method": "POST", "url": "Patient"}}
        for i in range(3 * CHUNK)
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    ok = fhir.post("", content=orjson.dumps(bundle), headers=FHIR_JSON)
    assert ok.status_code == 200, ok.text
    assert all(e["response"]["status"].startswith("201") for e in ok.json()["entry"])
    found = fhir.get("Patient", params={"identifier": f"urn:test|{marker}-{3 * CHUNK - 1}"}).json()
    assert len(found.get("entry", [])) == 1

    entries[2 * CHUNK + 1]["resource"]["birthDate"] = "never"
    for item in entries:
        item["resource"]["identifier"][0]["value"] += "-again"
    refused = fhir.post("", content=orjson.dumps(bundle), headers=FHIR_JSON)
    body = assert_outcome(refused, 400)
    assert f"Bundle.entry[{2 * CHUNK + 1}].resource.birthDate" in body["issue"][0]["expression"]
    again = fhir.get("Patient", params={"identifier": f"urn:test|{marker}-0-again"}).json()
    assert again.get("entry", []) == []
