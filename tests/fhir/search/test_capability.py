"""The CapabilityStatement claims exactly what works: every search parameter, modifier,
_include and _revinclude it lists for every type is exercised here (through batch
Bundles, so thousands of searches stay fast)."""

from __future__ import annotations

from tests.fhir.helpers import FHIR_JSON

VALUES = {
    "number": "1", "date": "2020", "string": "a", "token": "a", "reference": "x",
    "uri": "http://a", "quantity": "1", "special": "0|0|1|km",  # special: Location near
}
MODIFIER_VALUES = {
    "missing": "true", "exact": "a", "contains": "a", "not": "a", "text": "a",
    "of-type": "urn:s|c|v", "identifier": "urn:s|v", "above": "http://a/b", "below": "http://a",
    "in": "http://a/vs", "not-in": "http://a/vs",
}
# tokens: the terminology modifiers take a value set or a system|code the server knows
CODE_SYSTEM = "http://example.org/fhir/CodeSystem/capability-test"
VALUE_SET = "http://example.org/fhir/ValueSet/capability-test"
TOKEN_MODIFIER_VALUES = {"in": VALUE_SET, "not-in": VALUE_SET, "above": f"{CODE_SYSTEM}|a", "below": f"{CODE_SYSTEM}|a"}


def claims(statement: dict) -> list[str]:
    urls = []
    for resource in statement["rest"][0]["resource"]:
        type_ = resource["type"]
        for param in resource.get("searchParam", []):
            name, kind = param["name"], param["type"]
            if kind != "composite":
                urls.append(f"{type_}?{name}={VALUES[kind]}&_summary=count")
            documentation = param.get("documentation", "")
            for modifier in documentation.removeprefix("Modifiers: ").split(", ") if documentation else []:
                modifier = modifier.lstrip(":")
                values = {**MODIFIER_VALUES, **TOKEN_MODIFIER_VALUES} if kind == "token" else MODIFIER_VALUES
                value = values.get(modifier, "x")  # a reference :Type takes an id
                urls.append(f"{type_}?{name}:{modifier}={value}&_summary=count")
        for include in resource.get("searchInclude", []):
            urls.append(f"{type_}?_include={include}&_count=1")
        for include in resource.get("searchRevInclude", []):
            urls.append(f"{type_}?_revinclude={include}&_count=1")
    return urls


def terminology_definitions(fhir) -> None:
    """A code system a|b and a value set of it, for the token terminology modifiers."""
    code_system = {"resourceType": "CodeSystem", "id": "capability-test", "url": CODE_SYSTEM, "status": "active",
                   "content": "complete", "concept": [{"code": "a", "concept": [{"code": "b"}]}]}
    value_set = {"resourceType": "ValueSet", "id": "capability-test", "url": VALUE_SET, "status": "active",
                 "compose": {"include": [{"system": CODE_SYSTEM}]}}
    for resource in (code_system, value_set):
        response = fhir.put(f"{resource['resourceType']}/{resource['id']}", json=resource, headers=FHIR_JSON)
        assert response.status_code in (200, 201), response.text


def test_every_claimed_search_capability_works(fhir):
    terminology_definitions(fhir)
    statement = fhir.get("metadata").json()
    resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    assert {"search-type"} <= {i["code"] for i in resource["interaction"]}
    assert resource["conditionalCreate"] and resource["conditionalUpdate"] and resource["conditionalDelete"] == "multiple"
    assert {"search-system"} <= {i["code"] for i in statement["rest"][0]["interaction"]}
    assert "code-value-quantity" in {p["name"] for p in resource["searchParam"]}
    urls = claims(statement)
    assert len(urls) > 8000
    failures = []
    root = str(fhir.base_url).rstrip("/")
    for start in range(0, len(urls), 500):
        chunk = urls[start : start + 500]
        bundle = {"resourceType": "Bundle", "type": "batch",
                  "entry": [{"request": {"method": "GET", "url": url}} for url in chunk]}
        response = fhir.post(root, json=bundle, headers={**FHIR_JSON, "Prefer": "return=minimal"})
        assert response.status_code == 200, response.text[:500]
        for url, entry in zip(chunk, response.json()["entry"], strict=True):
            if not entry["response"]["status"].startswith("200"):
                failures.append((url, entry["response"]))
    assert not failures, sorted({(u.split('?')[1].split('=')[0], str(r.get('outcome', r))[:200]) for u, r in failures})[:40]


def test_terminology_modifiers_are_claimed_and_unclaimed_ones_refused(fhir):
    # the server installs the terminology service, so tokens claim :in/:below; strings no :below
    terminology_definitions(fhir)
    statement = fhir.get("metadata").json()
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    gender = next(p for p in patient["searchParam"] if p["name"] == "gender")
    family = next(p for p in patient["searchParam"] if p["name"] == "family")
    assert {":in", ":not-in", ":above", ":below"} <= set(gender["documentation"].removeprefix("Modifiers: ").split(", "))
    assert ":below" not in family["documentation"]
    assert fhir.get("Patient", params={"gender:in": VALUE_SET}).status_code == 200
    assert fhir.get("Patient", params={"family:below": "a"}).status_code == 400
