"""A transaction too large for MongoDB is a 413 OperationOutcome that writes nothing.

The server runs its own embedded mongod with the smallest WiredTiger cache
(KUROSHIO_MONGODB_CACHE_SIZE_GB=0.25), so a transaction Bundle of a few thousand
Observations passes what one MongoDB transaction may hold (TransactionTooLargeForCache).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import orjson

from server.store.mongod import EmbeddedMongod
from tests.conftest import start_server, stop_server
from tests.fhir.helpers import FHIR_JSON, assert_outcome

OBSERVATIONS = 4000
NOTE = "n" * 6000  # ~6 KB a resource: ~25 MB of request, twice that written (current + history)


def _observation(code: str, note: str = NOTE) -> dict[str, object]:
    return {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "urn:kuroshio:test", "code": code}]},
        "valueQuantity": {"value": 1.5, "unit": "mg"},
        "note": [{"text": note}],
    }


def _bundle(code: str, count: int, note: str = NOTE) -> bytes:
    entries = [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": _observation(code, note), "request": {"method": "POST", "url": "Observation"}}
        for _ in range(count)
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _mongod_command_line(data_dir: Path) -> list[bytes]:
    pid = (data_dir / "mongo" / "kuroshio-mongod.pid").read_text().strip()
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def test_default_cache_size_is_mongods_own(tmp_path):
    assert "--wiredTigerCacheSizeGB" not in EmbeddedMongod(tmp_path)._cache_flag()
    assert EmbeddedMongod(tmp_path, 0.25)._cache_flag() == ["--wiredTigerCacheSizeGB", "0.25"]


def test_transaction_too_large_for_the_cache_is_413_and_writes_nothing(tmp_path):
    # An empty URI: the server starts its own embedded mongod, with the small cache.
    live = start_server("", tmp_path, {"KUROSHIO_MONGODB_CACHE_SIZE_GB": "0.25"})
    try:
        command_line = _mongod_command_line(tmp_path)
        assert command_line[command_line.index(b"--wiredTigerCacheSizeGB") + 1] == b"0.25"
        code = uuid.uuid4().hex
        with httpx.Client(base_url=live.fhir + "/", timeout=120) as fhir:
            small = fhir.post("", content=_bundle(code, 2), headers=FHIR_JSON)
            assert small.status_code == 200, small.text  # the same entries, fewer: accepted

            response = fhir.post("", content=_bundle(code, OBSERVATIONS), headers=FHIR_JSON)
            body = assert_outcome(response, 413, "too-costly")
            diagnostics = body["issue"][0]["diagnostics"]
            # MongoDB says so (TransactionTooLargeForCache), or its writes found the cache full twice
            assert "TransactionTooLargeForCache" in diagnostics or "CacheFull" in diagnostics, diagnostics
            assert "nothing was written" in diagnostics, diagnostics
            assert "Traceback" not in response.text

            # Larger still (~54 MB): its writes find the cache full ("Cache full while performing
            # initial write", a WriteConflict labelled transient); PyMongo re-ran it for two
            # minutes and the answer was 503. Now the second full cache in a row ends it as too large.
            response = fhir.post("", content=_bundle(code, OBSERVATIONS, "n" * 14000), headers=FHIR_JSON)
            diagnostics = assert_outcome(response, 413, "too-costly")["issue"][0]["diagnostics"]
            assert "nothing was written" in diagnostics, diagnostics

            found = fhir.get("Observation", params={"code": f"urn:kuroshio:test|{code}", "_summary": "count"})
            assert found.json()["total"] == 2  # only the small transaction's
            history = fhir.get("Observation/_history", params={"_count": 1000}).json()
            assert len(history.get("entry", [])) == 2
            # The server still writes afterwards: the aborted transaction left no lock behind.
            assert fhir.post("Observation", content=orjson.dumps(_observation(code)), headers=FHIR_JSON).status_code == 201
    finally:
        stop_server(live)
