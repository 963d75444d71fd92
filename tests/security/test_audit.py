"""Every HTTP exchange passes the authorization gate and lands in the audit trail."""

from __future__ import annotations

import time
import uuid

import orjson


def audit_records(server) -> list[dict]:
    return [orjson.loads(line) for line in (server.data_dir / "audit.log").read_text().splitlines() if line]


def test_reads_writes_and_failures_are_audited(fhir, server):
    marker = uuid.uuid4().hex
    fhir.get(f"Patient/{marker}")
    fhir.post("Patient", content=b"{", headers={"Content-Type": "application/fhir+json"})
    fhir.get(f"NoRoute/{marker}/x/y")
    time.sleep(0.2)
    records = audit_records(server)
    mine = [r for r in records if marker in r["detail"]]
    assert len(mine) == 2
    read = next(r for r in mine if r["detail"].startswith("GET /fhir/Patient/"))
    assert read["outcome"] == 404
    assert (read["interface"], read["interaction"], read["type"]) == ("fhir", "read", "Patient")
    assert read["address"] == "127.0.0.1"
    unrouted = next(r for r in mine if "NoRoute" in r["detail"])
    assert unrouted["outcome"] == 404 and unrouted["interaction"] is None
    assert any(r["outcome"] == 400 and r["interaction"] == "create" for r in records)
