"""The HL7 terminology ecosystem tests against the live server: the pass rate may only
go up (it is recorded in conformance/tx_ecosystem/pass-rate.json).

As a terminology server is run in practice, the server first gets the FHIR R4 core
terminology (the CodeSystems and ValueSets of hl7.fhir.r4.examples); some tests use
http://hl7.org/fhir/ValueSet/administrative-gender."""

from __future__ import annotations

import json

from conformance.tx_ecosystem.runner import run, write_reports
from tests.conftest import ROOT, package_dir
from tests.terminology.conftest import shared_data, with_store

RECORDED = ROOT / "conformance" / "tx_ecosystem" / "pass-rate.json"


def test_tx_ecosystem_pass_rate(server, mongod, tmp_path):
    from terminology.loaders.npm import load_package

    core = package_dir("hl7.fhir.r4.examples")
    with_store(mongod.uri, lambda store: load_package(store, core, ("CodeSystem", "ValueSet")))
    report = run(server.fhir, shared_data() / "tx-ecosystem", {"flat"})
    write_reports(report, tmp_path)
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    failures = [f"{r.suite}/{r.test}: {r.message}" for r in report.counted if r.status != "pass"]
    assert len(report.counted) == recorded["run"], "the number of tests run changed; re-record the rate"
    assert report.passed >= recorded["passed"], (
        f"{report.passed} of {len(report.counted)} passed, below the recorded {recorded['passed']}; "
        f"report in {tmp_path}; first failures: " + "; ".join(failures[:5])
    )
    assert (tmp_path / "tx-ecosystem-report.html").is_file()
