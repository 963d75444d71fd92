"""The reference check: the official R4 examples are loaded, and for each of at least 300
(parameter, value) pairs drawn from them across resource types, the server's result set
is compared with an independent evaluation in this test: fhirpathpy evaluates the
parameter's FHIRPath expression over every example, and plain Python decides what the
search value matches (search.html's rules for tokens, strings, references, uris, dates
and numbers)."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import simplejson
from fhirpathpy import compile as fp_compile
from fhirpathpy.models import models

from server.fhir.definitions import resource_types
from server.fhir.search.parameters import REGISTRY
from tests.conftest import package_dir
from tests.fhir.helpers import FHIR_JSON
from tests.fhir.search.oracle import fold, library_expression
from tests.fhir.test_examples import REJECTED  # the examples R4 itself rules invalid

SKIP_TYPES = {
    "Bundle", "StructureDefinition", "SearchParameter", "ValueSet", "CodeSystem", "ConceptMap",
    "OperationDefinition", "CapabilityStatement", "CompartmentDefinition", "ImplementationGuide",
    "StructureMap", "NamingSystem", "MessageDefinition", "GraphDefinition", "TerminologyCapabilities",
}


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def load_examples(fhir, tag: dict) -> list[dict]:
    resources = []
    for path in sorted(Path(package_dir("hl7.fhir.r4.examples")).glob("*.json")):
        if path.stat().st_size > 100_000 or path.name == "package.json" or path.name in REJECTED:
            continue
        resource = json.loads(path.read_bytes(), parse_float=Decimal)
        if not isinstance(resource, dict) or resource.get("resourceType") not in REGISTRY.standard:
            continue
        if resource["resourceType"] in SKIP_TYPES:
            continue
        resource["meta"] = {**resource.get("meta", {}), "tag": [*resource.get("meta", {}).get("tag", []), tag]}
        resources.append(resource)
    stored = []
    root = str(fhir.base_url).rstrip("/")
    for start in range(0, len(resources), 250):
        chunk = resources[start : start + 250]
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in chunk
        ]}
        response = fhir.post(root, content=simplejson.dumps(bundle, use_decimal=True).encode(), headers=FHIR_JSON)
        assert response.status_code == 200, response.text[:300]
        for entry in json.loads(response.content, parse_float=Decimal)["entry"]:
            assert entry["response"]["status"].startswith("201"), entry["response"]
            stored.append(entry["resource"])
    return stored


# --- the oracle -----------------------------------------------------------------------------


def _date_range(text: str) -> tuple[datetime, datetime] | None:
    if not isinstance(text, str) or len(text) < 4:
        return None
    try:
        if len(text) == 4:
            low = datetime(int(text), 1, 1, tzinfo=UTC)
            return low, datetime(int(text) + 1, 1, 1, tzinfo=UTC) - timedelta(milliseconds=1)
        if len(text) == 7:
            year, month = int(text[:4]), int(text[5:7])
            low = datetime(year, month, 1, tzinfo=UTC)
            high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            return low, high - timedelta(milliseconds=1)
        if len(text) == 10:
            low = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return low, low + timedelta(days=1) - timedelta(milliseconds=1)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
        seconds = text[11:].split("+")[0].split("-")[0].rstrip("Z")
        if "." in seconds:
            return moment, moment
        step = timedelta(seconds=1) if seconds.count(":") == 2 else timedelta(minutes=1)
        return moment, moment + step - timedelta(milliseconds=1)
    except ValueError:
        return None


def _ranges(value) -> list[tuple[datetime, datetime]] | None:
    """Date ranges of a value, or None if the oracle does not handle its shape."""
    if isinstance(value, str):
        found = _date_range(value)
        return [found] if found else []
    if isinstance(value, dict) and set(value) <= {"start", "end", "id", "extension"}:
        start = _date_range(value["start"]) if "start" in value else None
        end = _date_range(value["end"]) if "end" in value else None
        if not start and not end:
            return []
        return [(start[0] if start else datetime.min.replace(tzinfo=UTC), end[1] if end else datetime.max.replace(tzinfo=UTC))]
    return None


def _tokens(value) -> list[tuple[str | None, str]]:
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str):
        return [(None, value)]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "system" not in value and "value" not in value):
        return [(c.get("system"), c["code"]) for c in value.get("coding", []) if "code" in c]
    if "code" in value:
        return [(value.get("system"), value["code"])]
    if "value" in value and isinstance(value["value"], str):
        return [(value.get("system"), value["value"])]
    return []


_NAME_PARTS = ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, dict):
        return []
    found = []
    for part in _NAME_PARTS:
        item = value.get(part)
        found.extend(item if isinstance(item, list) else [item] if isinstance(item, str) else [])
    return [s for s in found if isinstance(s, str)]


def _reference(value) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return None
    parts = value["reference"].split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2] in resource_types() else None


def _numbers(value) -> list[Decimal] | None:
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return [Decimal(value)]
    if isinstance(value, dict) and set(value) & {"low", "high", "numerator"}:
        return None
    if isinstance(value, dict) and isinstance(value.get("value"), (int, Decimal)):
        return [Decimal(value["value"])]
    return []


def pair_for(kind: str, values: list) -> tuple[str, object] | None:
    """A search value drawn from a resource's values, and the test that decides a match."""
    for value in values:
        if kind == "token":
            for system, code in _tokens(value):
                if code and isinstance(code, str):
                    query = f"{escape(system)}|{escape(code)}" if system else escape(code)
                    return query, lambda vs, s=system, c=code: any(
                        (tc == c and (s is None or ts == s)) for v in vs for ts, tc in _tokens(v))
        elif kind == "string":
            for text in _strings(value):
                prefix = fold(text)[:5].strip()
                if prefix:
                    return escape(prefix), lambda vs, p=prefix: any(fold(t).startswith(p) for v in vs for t in _strings(v))
        elif kind == "reference":
            target = _reference(value)
            if target:
                return escape(target), lambda vs, t=target: any(_reference(v) == t for v in vs)
        elif kind == "uri" and isinstance(value, str):
            return escape(value), lambda vs, u=value: u in vs
        elif kind == "date":
            found = _ranges(value)
            if found:
                year = found[0][0].year if found[0][0].year > 1 else found[0][1].year
                if not 1 < year < 9999:
                    continue
                low = datetime(year, 1, 1, tzinfo=UTC)
                high = datetime(year + 1, 1, 1, tzinfo=UTC) - timedelta(milliseconds=1)
                return str(year), lambda vs, lo=low, hi=high: any(
                    a >= lo and b <= hi for v in vs for a, b in (_ranges(v) or []))
        elif kind in ("number", "quantity"):
            numbers = _numbers(value)
            if numbers:
                number = numbers[0]
                exponent = number.as_tuple().exponent
                half = Decimal(5).scaleb(exponent - 1)
                return str(number), lambda vs, lo=number - half, hi=number + half: any(
                    lo <= n <= hi for v in vs for n in (_numbers(v) or []))
    return None


def test_server_agrees_with_an_independent_evaluation_of_the_examples(fhir):
    run = uuid.uuid4().hex[:12]
    tag = {"system": "urn:kuroshio-reference-check", "code": run}
    stored = load_examples(fhir, tag)
    assert len(stored) > 500
    by_type: dict[str, list[dict]] = defaultdict(list)
    for resource in stored:
        by_type[resource["resourceType"]].append(resource)

    checked, mismatches, types = 0, [], set()
    for type_, resources in sorted(by_type.items()):
        for code, parameter in sorted(REGISTRY.standard[type_].items()):
            if parameter.type in ("composite", "special") or not parameter.expression or code.startswith("_"):
                continue
            evaluate = fp_compile(library_expression(parameter.expression), models["r4"])
            values = {r["id"]: evaluate(r, {"resource": r}) for r in resources}
            if parameter.type == "date" and any(_ranges(v) is None for vs in values.values() for v in vs):
                continue  # Timing and other shapes: outside this oracle
            if parameter.type in ("number", "quantity") and any(_numbers(v) is None for vs in values.values() for v in vs):
                continue
            pair = next((p for vs in values.values() if (p := pair_for(parameter.type, vs))), None)
            if pair is None:
                continue
            query, matches = pair
            expected = {id_ for id_, vs in values.items() if matches(vs)}
            response = fhir.get(type_, params={code: query, "_tag": f"{tag['system']}|{run}", "_count": "1000", "_elements": "id"})
            assert response.status_code == 200, (type_, code, query, response.text[:300])
            actual = {e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"}
            if actual != expected:
                mismatches.append((type_, code, query, sorted(actual - expected)[:3], sorted(expected - actual)[:3]))
            checked += 1
            types.add(type_)
    print(f"reference check: {checked} pairs over {len(types)} types, {len(stored)} examples")
    assert not mismatches, mismatches[:25]
    assert checked >= 300 and len(types) >= 80, (checked, len(types))
