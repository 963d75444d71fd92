"""Every official R4 example (npm hl7.fhir.r4.examples 4.0.1) through a live server.

Each resource file of the package (examples, and the specification's own definitions:
StructureDefinitions, SearchParameters, ValueSets, CodeSystems, ConceptMaps, Bundles) is
POSTed to its type's endpoint and read back. The read-back JSON must be the example's
JSON exactly, apart from the server-set `id` and `meta.versionId`/`meta.lastUpdated`:
both sides are compared as compact JSON (simplejson, decimals kept as written, same key
order, UTF-8), and the served bytes must already be in that compact form, so the
comparison is byte for byte.

The server rejects the examples in `REJECTED`, each for a defect of the example against
the R4 definitions (checked against the spec; the reason says where), and the test
checks that the rejection names that element.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import simplejson

from tests.conftest import LiveServer, package_dir
from tests.fhir.helpers import FHIR_JSON

CONCURRENCY = 4

# file -> (the FHIRPath expression the OperationOutcome must name, why the example is invalid)
REJECTED: dict[str, tuple[str, str]] = {
    # narrative.html, Narrative.div invariant txt-2: "The narrative SHALL have some
    # non-whitespace content"; these divs hold only whitespace.
    "ActivityDefinition-blood-tubes-supply.json": (
        "ActivityDefinition.text.div", "txt-2: the narrative div holds only whitespace"),
    "ActivityDefinition-heart-valve-replacement.json": (
        "ActivityDefinition.text.div", "txt-2: the narrative div holds only whitespace"),
    "EventDefinition-example.json": (
        "EventDefinition.text.div", "txt-2: the narrative div holds only whitespace"),
    "Questionnaire-zika-virus-exposure-assessment.json": (
        "Questionnaire.text.div", "txt-2: the narrative div holds only whitespace (an empty <pre>)"),
    # ImplementationGuide.name and .status are 1..1; the package's own IG (twice) has
    # neither, and one manifest reference has a 67-character id (id is at most 64).
    "ImplementationGuide-fhir.json": ("ImplementationGuide.name", "name and status (1..1) missing"),
    "ig-r4.json": ("ImplementationGuide.name", "name and status (1..1) missing"),
    # Questionnaire.item.linkId is 1..1; the nested items of qs1 have none.
    "Questionnaire-qs1.json": ("Questionnaire.item[0].item[0].linkId", "nested items without linkId (1..1)"),
    # SearchParameter.base is 1..*; these extension search parameters have none.
    **{
        f"SearchParameter-{name}.json": ("SearchParameter.base", "base (1..*) missing")
        for name in (
            "codesystem-extensions-CodeSystem-author",
            "codesystem-extensions-CodeSystem-effective",
            "codesystem-extensions-CodeSystem-end",
            "codesystem-extensions-CodeSystem-keyword",
            "codesystem-extensions-CodeSystem-workflow",
            "valueset-extensions-ValueSet-author",
            "valueset-extensions-ValueSet-effective",
            "valueset-extensions-ValueSet-end",
            "valueset-extensions-ValueSet-keyword",
            "valueset-extensions-ValueSet-workflow",
        )
    },
}

def compact(document: dict[str, Any]) -> bytes:
    return simplejson.dumps(
        document, use_decimal=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def parse(raw: bytes) -> dict[str, Any]:
    document = simplejson.loads(raw, use_decimal=True)
    assert isinstance(document, dict)
    return document


def server_set(document: dict[str, Any]) -> tuple[list[str], bytes]:
    """The keys besides id and meta in order, and meta without versionId/lastUpdated."""
    meta = {k: v for k, v in document.get("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    return [key for key in document if key not in ("id", "meta")], compact(meta)


def same_apart_from_id_and_meta(served_bytes: bytes, served: dict[str, Any], example: dict[str, Any]) -> bool:
    """The served bytes are the example's compact JSON with the server's id and meta."""
    if server_set(served) != server_set(example):
        return False
    expected = {key: served[key] if key in ("id", "meta") else example[key] for key in served}
    return compact(expected) == served_bytes


def example_files() -> list[Path]:
    return sorted(
        path for path in package_dir("hl7.fhir.r4.examples").glob("*.json") if path.name != "package.json"
    )


@dataclass
class Outcome:
    name: str
    status: int
    problem: str | None = None  # why an accepted example did not round-trip
    expressions: tuple[str, ...] = ()


def round_trip(client: httpx.Client, path: Path) -> Outcome:
    raw = path.read_bytes()
    example = parse(raw)
    created = client.post(
        example["resourceType"], content=raw, headers={**FHIR_JSON, "Prefer": "return=minimal"}
    )
    if created.status_code != 201:
        expressions: tuple[str, ...] = ()
        if created.headers.get("content-type", "").startswith("application/fhir+json"):
            body = created.json()
            expressions = tuple(e for issue in body.get("issue", []) for e in issue.get("expression", []))
        return Outcome(path.name, created.status_code, created.text[:300], expressions)
    read = client.get(created.headers["Location"].rsplit("/_history/", 1)[0])
    if read.status_code != 200:
        return Outcome(path.name, 201, f"read answered {read.status_code}")
    served = parse(read.content)
    if not same_apart_from_id_and_meta(read.content, served, example):
        return Outcome(path.name, 201, "the read-back JSON differs from the example")
    if served["meta"]["versionId"] != "1" or "lastUpdated" not in served["meta"]:
        return Outcome(path.name, 201, f"unexpected meta {served['meta']}")
    return Outcome(path.name, 201)


@pytest.fixture(scope="module")
def outcomes(server: LiveServer) -> dict[str, Outcome]:
    files = example_files()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(base_url=server.fhir + "/", timeout=300, limits=limits) as client:
        # Largest first, so the big Bundles do not end up alone at the tail.
        files.sort(key=lambda path: -path.stat().st_size)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return {o.name: o for o in pool.map(lambda path: round_trip(client, path), files)}


def test_package_is_complete() -> None:
    files = example_files()
    assert len(files) == 5306
    names = {path.name for path in files}
    assert set(REJECTED) <= names


def test_every_valid_example_round_trips(outcomes: dict[str, Outcome]) -> None:
    accepted = {name: o for name, o in outcomes.items() if name not in REJECTED}
    failures = {name: (o.status, o.problem) for name, o in accepted.items() if o.status != 201 or o.problem}
    assert not failures
    assert len(accepted) == 5306 - len(REJECTED)
    # Bundle-resources.json (29.7 MB compact) is over MongoDB's 16 MB document limit:
    # it is stored in chunks and must come back whole like any other.
    assert accepted["Bundle-resources.json"].status == 201


def test_exactly_the_listed_examples_are_rejected_for_their_defect(outcomes: dict[str, Outcome]) -> None:
    rejected = {name for name, o in outcomes.items() if o.status != 201}
    assert rejected == set(REJECTED)
    for name, (expression, _reason) in REJECTED.items():
        outcome = outcomes[name]
        assert outcome.status == 400, (name, outcome.problem)
        assert expression in outcome.expressions, (name, outcome.expressions)
