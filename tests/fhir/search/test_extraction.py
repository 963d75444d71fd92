"""Search-term extraction, without a server: every R4 expression is evaluable, the
compiled extractors agree with fhirpathpy, and values become the right terms."""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models

from server.fhir import jsonio
from server.fhir.search import terms
from server.fhir.search.fhirpath import compile_expression
from server.fhir.search.parameters import REGISTRY
from tests.conftest import package_dir
from tests.fhir.search.oracle import library_expression


def test_every_r4_expression_is_evaluable():
    compiled, fallback = 0, []
    for type_, parameters in REGISTRY.standard.items():
        for code, parameter in parameters.items():
            if not parameter.expression:
                assert code in ("_text", "_content"), (type_, code)
                continue
            extractor = compile_expression(parameter.expression, type_)
            if extractor.fallback:
                fallback.append(f"{type_}.{code}")
            else:
                assert extractor.paths, (type_, code, parameter.expression)
                compiled += 1
    assert compiled > 2500
    assert fallback == []  # fhirpathpy is left for custom parameters
    assert terms.check_all() > 2200  # every plan, composites included, builds


def _canonical(values):
    # FHIRPath `|` is a set union, so compare the distinct values
    return sorted({json.dumps(v, sort_keys=True, default=float) for v in values})  # fhirpathpy: Decimal


def _examples(limit_per_type: int = 3) -> list[dict]:
    root = package_dir("hl7.fhir.r4.examples")
    chosen: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(Path(root).glob("*.json")):
        if path.stat().st_size > 200_000 or path.name == "package.json":
            continue
        resource = jsonio.loads(path.read_bytes())
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        if kind in REGISTRY.standard and len(chosen[kind]) < limit_per_type:
            chosen[kind].append(resource)
    return [r for rs in chosen.values() for r in rs]


def test_compiled_extractors_agree_with_fhirpathpy_on_the_examples():
    checked = 0
    for resource in _examples():
        type_ = resource["resourceType"]
        plain = jsonio.plain(resource)
        for code, parameter in REGISTRY.standard[type_].items():
            if not parameter.expression:
                continue
            extractor = compile_expression(parameter.expression, type_)
            ours = [v for v, _ in extractor.values(plain, lambda: plain)]
            theirs = evaluate(plain, library_expression(parameter.expression), {"resource": plain}, models["r4"])
            assert _canonical(ours) == _canonical(theirs), (type_, resource.get("id"), code, parameter.expression)
            checked += bool(theirs)
    assert checked > 500


@pytest.mark.parametrize("deceased", [{}, {"deceasedBoolean": False}, {"deceasedBoolean": True},
                                      {"deceasedDateTime": "2020-01-01"}])
def test_patient_deceased_agrees_with_fhirpathpy(deceased):
    parameter = REGISTRY.standard["Patient"]["deceased"]
    patient = {"resourceType": "Patient", **deceased}
    ours = [v for v, _ in compile_expression(parameter.expression, "Patient").values(patient, lambda: patient)]
    assert ours == evaluate(patient, parameter.expression, {"resource": patient}, models["r4"])


def _observation(**value):
    return {"resourceType": "Observation", "id": "x", "status": "final", "code": {"text": "t"}, **value}


@pytest.mark.parametrize(
    "text,low,high",
    [
        ("2013", "2013-01-01T00:00:00+00:00", "2013-12-31T23:59:59.999000+00:00"),
        ("2013-02", "2013-02-01T00:00:00+00:00", "2013-02-28T23:59:59.999000+00:00"),
        ("2012-12-31", "2012-12-31T00:00:00+00:00", "2012-12-31T23:59:59.999000+00:00"),
        ("2013-01-14T10:00+10:00", "2013-01-14T00:00:00+00:00", "2013-01-14T00:00:59.999000+00:00"),
        ("2013-01-14T10:00:05.5Z", "2013-01-14T10:00:05.500000+00:00", "2013-01-14T10:00:05.500000+00:00"),
    ],
)
def test_dates_are_ranges_of_their_precision(text, low, high):
    lo, hi = terms.date_range(text)
    assert (lo.isoformat(), hi.isoformat()) == (low, high)


def test_periods_and_open_ends():
    s = terms.index(_observation(effectivePeriod={"start": "2020-01-01"}))
    (entry,) = [v for v in s["v"] if v["p"] == "date"]
    assert entry["lo"].year == 2020 and entry["hi"] == terms.MAX_DATE


def test_strings_are_accent_and_case_insensitive():
    s = terms.index({"resourceType": "Patient", "id": "x", "name": [{"family": "Müller", "given": ["Ægir"]}]})
    assert "family:muller" in s["k"] and "family=Müller" in s["k"]
    assert "given:ægir" in s["k"] or "given:aegir" in s["k"]


def test_tokens_references_and_canonical_quantities():
    s = terms.index(_observation(
        subject={"reference": "http://other.org/fhir/Patient/7/_history/2"},
        valueQuantity={"value": Decimal("1.50"), "system": "http://unitsofmeasure.org", "code": "g/L"},
        identifier=[{"system": "urn:s", "value": "v", "type": {"coding": [{"system": "urn:t", "code": "MR"}]}}],
    ))
    assert {"subject>Patient/7", "subject>http://other.org/fhir/Patient/7"} <= set(s["k"])
    assert {"identifier|urn:s|v", "identifier#v", "identifier!urn:t|MR|v"} <= set(s["k"])
    canonical = [v for v in s["v"] if v["p"] == "value-quantity" and v["s"] == "~"]
    assert canonical and canonical[0]["c"] == "kilogram / meter ** 3" and abs(canonical[0]["lo"] - 1.5) < 1e-9
