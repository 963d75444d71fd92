"""fhir.resources checks of large transactions, in a worker process: the same verdicts as
in-process, at the right entry, and a large transaction is all-or-nothing."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from pymongo import AsyncMongoClient, monitoring

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


def test_a_fault_found_after_the_writes_aborts_the_transaction(mongod, monkeypatch):
    """The entries are written while the worker still checks them, and the transaction
    commits only on its verdict: a fault it finds (here one the R4 validator would not
    find, as fhir.resources' own rules may) aborts the writes, and nothing is left."""
    import server.fhir.search  # noqa: F401  (installs the search hooks, as the server does)
    from server.fhir.outcome import FhirError
    from server.fhir.transaction import transaction
    from server.store.database import Store
    from server.store.fhir import FhirStore

    marker = uuid.uuid4().hex
    monkeypatch.setattr(
        library_checks, "fhir_resources_issues",
        lambda resource: [library_checks.Issue("value", "refused late", "error", ("Patient.gender",))]
        if resource.get("gender") == "unknown" else [],
    )
    entries = [{"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:late", "value": f"{marker}-{i}"}],
                             **({"gender": "unknown"} if i == CHUNK + 2 else {})},
                "request": {"method": "POST", "url": "Patient"}} for i in range(CHUNK + 5)]

    async def dispatch(*_: object, **__: object) -> None:
        raise AssertionError("no GET entries here")

    commands: list[str] = []

    class Listener(monitoring.CommandListener):
        def started(self, event: monitoring.CommandStartedEvent) -> None:
            commands.append(event.command_name)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    async def scenario() -> tuple[FhirError, int, int]:
        store = Store(AsyncMongoClient(mongod.uri, event_listeners=[Listener()]), f"kuroshio_late_{marker[:8]}")
        try:
            await store.ensure_collections()
            db = FhirStore(store)
            with pytest.raises(FhirError) as refused:
                await transaction(db, {"resourceType": "Bundle", "type": "transaction", "entry": entries},
                                  "http://test/fhir", dispatch, True)
            return refused.value, await db.resources.count_documents({}), await db.history.count_documents({})
        finally:
            await store.close()

    library_checks.configure(0)  # in-process: the patched check is the one that runs
    refused, resources, versions = asyncio.run(scenario())
    assert refused.status == 400
    assert refused.issues[0].expression == (f"Bundle.entry[{CHUNK + 2}].resource.gender",)
    assert (resources, versions) == (0, 0)
    assert "insert" in commands and "abortTransaction" in commands and "commitTransaction" not in commands
