"""Run the HL7 terminology ecosystem tests (`test-cases.json`) against any FHIR R4 server.

For each suite the setup resources are sent with every request as `tx-resource`
parameters (as the upstream runner does, so nothing is written to the server), each
test's request goes to `ValueSet/$expand`, `ValueSet/$validate-code`,
`CodeSystem/$validate-code`, `CodeSystem/$lookup` or `ConceptMap/$translate` by POST,
and the answer (R4) is brought to the R5 form the expectations are written in before
it is compared (see compare.py). Tests whose mode is not enabled are skipped, as
upstream; a test whose expected file is missing from the folder is reported as such.
The results go to a JSON report and an HTML report.

Usage: python -m conformance.tx_ecosystem BASE_URL [--tests DIR] [--out DIR] [--modes flat]
"""

from __future__ import annotations

import copy
import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conformance.tx_ecosystem.compare import Comparer, normalize

ENDPOINTS = {
    "expand": "ValueSet/$expand",
    "validate-code": "ValueSet/$validate-code",
    "cs-validate-code": "CodeSystem/$validate-code",
    "lookup": "CodeSystem/$lookup",
    "translate": "ConceptMap/$translate",
}
XV = "http://hl7.org/fhir/5.0/StructureDefinition/extension-"
R5_TO_R4_EQUIVALENCE = {
    "related-to": "relatedto",
    "equivalent": "equivalent",
    "source-is-narrower-than-target": "wider",
    "source-is-broader-than-target": "narrower",
    "not-related-to": "unmatched",
}


@dataclass
class Result:
    suite: str
    test: str
    operation: str
    status: str  # pass | fail | error | skipped
    message: str | None = None
    http_status: int | None = None
    seconds: float = 0.0
    actual: Any = None


@dataclass
class Report:
    base_url: str
    modes: list[str]
    results: list[Result] = field(default_factory=list)

    @property
    def counted(self) -> list[Result]:
        return [r for r in self.results if r.status != "skipped"]

    @property
    def passed(self) -> int:
        return sum(1 for r in self.counted if r.status == "pass")

    @property
    def rate(self) -> float:
        return self.passed / len(self.counted) if self.counted else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "modes": self.modes,
            "run": len(self.counted),
            "passed": self.passed,
            "rate": round(self.rate, 4),
            "skipped": [f"{r.suite}/{r.test}: {r.message}" for r in self.results if r.status == "skipped"],
            "results": [{k: v for k, v in asdict(r).items() if k != "actual"} for r in self.results],
        }

    def to_html(self) -> str:
        rows = "\n".join(
            f"<tr class='{r.status}'><td>{html.escape(r.suite)}</td><td>{html.escape(r.test)}</td>"
            f"<td>{r.operation}</td><td>{r.status}</td><td>{r.http_status or ''}</td>"
            f"<td><pre>{html.escape(r.message or '')}</pre></td></tr>"
            for r in self.results
        )
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>HL7 terminology tests</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:2px 6px}} .pass{{background:#e6ffe6}}
.fail,.error{{background:#ffe6e6}} .skipped{{color:#888}} pre{{white-space:pre-wrap;margin:0}}</style></head><body>
<h1>HL7 terminology ecosystem tests</h1>
<p>Server: {html.escape(self.base_url)} &mdash; modes: {html.escape(', '.join(self.modes))}</p>
<p><b>{self.passed} of {len(self.counted)} passed ({self.rate:.1%})</b>; {len(self.results) - len(self.counted)} skipped.</p>
<table><tr><th>suite</th><th>test</th><th>operation</th><th>result</th><th>HTTP</th><th>message</th></tr>
{rows}</table></body></html>"""


def load(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text(encoding="utf-8-sig"))


def to_r4(resource: dict[str, Any]) -> dict[str, Any]:
    """The R5 test resources in R4 form (only what differs for these resources)."""
    resource = copy.deepcopy(resource)
    if resource.get("resourceType") == "ConceptMap":
        for old, new in (("sourceScopeUri", "sourceUri"), ("targetScopeUri", "targetUri"),
                         ("sourceScopeCanonical", "sourceCanonical"), ("targetScopeCanonical", "targetCanonical")):
            if old in resource:
                resource[new] = resource.pop(old)
        for group in resource.get("group", []):
            unmapped = group.get("unmapped")
            if isinstance(unmapped, dict) and "relationship" in unmapped:
                unmapped.pop("relationship")
            for element in group.get("element", []):
                for target in element.get("target", []):
                    if "relationship" in target:
                        target["equivalence"] = R5_TO_R4_EQUIVALENCE.get(target.pop("relationship"), "relatedto")
    return resource


def _cross_version(node: dict[str, Any], element: str) -> list[dict[str, Any]]:
    """Turn R5 cross-version extensions for `element` back into R5 element values."""
    url = XV + element
    values = []
    kept = []
    for ext in node.get("extension", []):
        if ext.get("url") != url:
            kept.append(ext)
            continue
        item: dict[str, Any] = {}
        for sub in ext.get("extension", []):
            for key, val in sub.items():
                if key.startswith("value"):
                    if sub.get("url") == "value":
                        item[key] = val
                    else:
                        item[sub.get("url")] = val
        values.append(item)
    node["extension"] = kept
    if not kept:
        del node["extension"]
    return values


def to_r5(resource: dict[str, Any]) -> dict[str, Any]:
    """An R4 answer in the R5 form the expectations use."""
    if resource.get("resourceType") == "ValueSet" and isinstance(resource.get("expansion"), dict):
        expansion = resource["expansion"]
        properties = _cross_version(expansion, "ValueSet.expansion.property")
        if properties:
            expansion["property"] = properties

        def walk(items: list[dict[str, Any]]) -> None:
            for item in items:
                props = _cross_version(item, "ValueSet.expansion.contains.property")
                if props:
                    item["property"] = props
                walk(item.get("contains", []))

        walk(expansion.get("contains", []))
    return resource


def choose(test: dict[str, Any], name: str, modes: set[str]) -> str | None:
    for mode in sorted(modes):
        if f"{name}:{mode}" in test:
            return test[f"{name}:{mode}"]
    return test.get(name)


def http_ok(expected: str, status: int) -> bool:
    return status // 100 == int(expected[0])


def run(base_url: str, folder: Path, modes: set[str] | None = None, only: str | None = None, timeout: float = 60) -> Report:
    modes = set(modes or {"flat"})
    compare_modes = modes | {"version:4"}  # an R4 server: R4-only expectations apply
    cases = load(folder, "test-cases.json")
    report = Report(base_url, sorted(modes))
    with httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=timeout) as client:
        for suite in cases["suites"]:
            if suite.get("mode") and suite["mode"] not in modes and suite["mode"] != "general":
                continue
            setup = [to_r4(load(folder, name)) for name in suite.get("setup", [])]
            for test in suite["tests"]:
                if only and only not in test["name"]:
                    continue
                report.results.append(run_test(client, folder, suite, test, setup, modes, compare_modes))
    return report


def run_test(
    client: httpx.Client, folder: Path, suite: dict[str, Any], test: dict[str, Any],
    setup: list[dict[str, Any]], modes: set[str], compare_modes: set[str],
) -> Result:
    name, operation = test["name"], test.get("operation", "")
    result = Result(suite["name"], name, operation, "skipped")
    if test.get("mode") and test["mode"] not in modes:
        result.message = f"mode {test['mode']} not enabled"
        return result
    if test.get("disabled"):
        result.message = "disabled upstream"
        return result
    response_file = choose(test, "response", modes)
    if operation not in ENDPOINTS:
        result.message = f"operation {operation} is not a terminology operation this runner sends"
        if operation in ("metadata", "term-caps") and response_file and not (folder / response_file).exists():
            result.message = f"expected file {response_file} is not in the provided test folder"
        return result
    request_file = choose(test, "request", modes)
    started = time.perf_counter()
    try:
        parameters = load(folder, request_file) if request_file else {"resourceType": "Parameters", "parameter": []}
        expected = load(folder, response_file) if response_file else None
        parameters = copy.deepcopy(parameters)
        parameters.setdefault("parameter", []).extend({"name": "tx-resource", "resource": r} for r in setup)
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if test.get("Accept-Language"):
            headers["Accept-Language"] = test["Accept-Language"]
        header = test.get("header")
        if isinstance(header, dict) and header.get("mode") in modes:
            headers[header["name"]] = header["value"]
        response = client.post(ENDPOINTS[operation], content=json.dumps(parameters), headers=headers)
        result.http_status = response.status_code
        actual = normalize(to_r5(response.json()))
        result.actual = actual
        problem = Comparer(compare_modes).compare(expected, actual) if expected is not None else None
        wanted = test.get("http-code", "2xx")
        if not http_ok(wanted, response.status_code):
            problem = f"Response Code fail: should be '{wanted}' but is '{response.status_code}'" + (f"; {problem}" if problem else "")
        result.status = "fail" if problem else "pass"
        result.message = problem
    except (httpx.HTTPError, ValueError, OSError) as exc:
        result.status = "error"
        result.message = f"{type(exc).__name__}: {exc}"
    result.seconds = round(time.perf_counter() - started, 4)
    return result


def write_reports(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tx-ecosystem-report.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    (out / "tx-ecosystem-report.html").write_text(report.to_html(), encoding="utf-8")
