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
                value = MODIFIER_VALUES.get(modifier, "x")  # a reference :Type takes an id
                urls.append(f"{type_}?{name}:{modifier}={value}&_summary=count")
        for include in resource.get("searchInclude", []):
            urls.append(f"{type_}?_include={include}&_count=1")
        for include in resource.get("searchRevInclude", []):
            urls.append(f"{type_}?_revinclude={include}&_count=1")
    return urls


def test_every_claimed_search_capability_works(fhir):
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


def test_unclaimed_modifiers_are_refused(fhir):
    # tokens claim no :in/:below without the terminology service; strings no :below
    statement = fhir.get("metadata").json()
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    gender = next(p for p in patient["searchParam"] if p["name"] == "gender")
    assert ":in" not in gender["documentation"]
    assert fhir.get("Patient", params={"gender:in": "http://a/vs"}).status_code == 400
    assert fhir.get("Patient", params={"family:below": "a"}).status_code == 400
