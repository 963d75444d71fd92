"""The terminology operations over real HTTP against definitions written through the
FHIR API (the after-write hook makes them effective at once)."""

from __future__ import annotations

import json
import uuid

from tests.fhir.helpers import FHIR_JSON


def params(*pairs: tuple[str, str, object]) -> str:
    return json.dumps({"resourceType": "Parameters", "parameter": [{"name": n, k: v} for n, k, v in pairs]})


def out(body: dict, name: str):
    return [next(v for k, v in p.items() if k.startswith("value")) for p in body["parameter"] if p["name"] == name and any(k.startswith("value") for k in p)]


def code_system(url: str, display: str = "Alpha") -> dict:
    return {
        "resourceType": "CodeSystem", "url": url, "version": "1", "name": "Test", "status": "active",
        "content": "complete", "hierarchyMeaning": "is-a",
        "concept": [
            {"code": "a", "display": display, "concept": [
                {"code": "a1", "display": "Alpha one"},
                {"code": "a2", "display": "Alpha two", "property": [{"code": "status", "valueCode": "retired"}]},
            ]},
            {"code": "b", "display": "Beta"},
        ],
    }


def test_code_system_written_through_fhir_is_effective_at_once(fhir):
    url = f"http://example.org/cs/{uuid.uuid4()}"
    created = fhir.post("CodeSystem", content=json.dumps(code_system(url)), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    id_ = created.json()["id"]
    looked = fhir.get("CodeSystem/$lookup", params={"system": url, "code": "a1"})
    assert looked.status_code == 200, looked.text
    assert out(looked.json(), "display") == ["Alpha one"]
    assert out(looked.json(), "name") == ["Test"]

    changed = code_system(url, "Alpha (renamed)")
    changed["id"] = id_
    assert fhir.put(f"CodeSystem/{id_}", content=json.dumps(changed), headers=FHIR_JSON).status_code == 200
    again = fhir.post("CodeSystem/$lookup", content=params(("system", "valueUri", url), ("code", "valueCode", "a")), headers=FHIR_JSON)
    assert out(again.json(), "display") == ["Alpha (renamed)"]
    instance = fhir.get(f"CodeSystem/{id_}/$lookup", params={"code": "b"})
    assert out(instance.json(), "display") == ["Beta"]

    assert fhir.delete(f"CodeSystem/{id_}").status_code == 204
    gone = fhir.get("CodeSystem/$lookup", params={"system": url, "code": "a"})
    assert gone.status_code == 404
    assert gone.json()["issue"][0]["code"] == "not-found"


def test_value_set_expand_validate_and_paging(fhir):
    url = f"http://example.org/cs/{uuid.uuid4()}"
    fhir.post("CodeSystem", content=json.dumps(code_system(url)), headers=FHIR_JSON)
    vs_url = f"http://example.org/vs/{uuid.uuid4()}"
    vs = {"resourceType": "ValueSet", "url": vs_url, "status": "active", "compose": {"include": [
        {"system": url, "filter": [{"property": "concept", "op": "is-a", "value": "a"}]}]}}
    created = fhir.post("ValueSet", content=json.dumps(vs), headers=FHIR_JSON)
    expanded = fhir.get("ValueSet/$expand", params={"url": vs_url})
    assert expanded.status_code == 200, expanded.text
    codes = [c["code"] for c in expanded.json()["expansion"]["contains"]]
    assert codes == ["a", "a1", "a2"]
    assert expanded.json()["expansion"]["total"] == 3
    page = fhir.get(f"ValueSet/{created.json()['id']}/$expand", params={"count": "1", "offset": "1"}).json()
    assert [c["code"] for c in page["expansion"]["contains"]] == ["a1"]
    assert page["expansion"]["total"] == 3 and page["expansion"]["offset"] == 1
    active = fhir.get("ValueSet/$expand", params={"url": vs_url, "activeOnly": "true"}).json()
    assert [c["code"] for c in active["expansion"]["contains"]] == ["a", "a1"]
    text = fhir.get("ValueSet/$expand", params={"url": vs_url, "filter": "two"}).json()
    assert [c["code"] for c in text["expansion"]["contains"]] == ["a2"]

    good = fhir.get("ValueSet/$validate-code", params={"url": vs_url, "system": url, "code": "a1"}).json()
    assert out(good, "result") == [True] and out(good, "display") == ["Alpha one"]
    outside = fhir.get("ValueSet/$validate-code", params={"url": vs_url, "system": url, "code": "b"}).json()
    assert out(outside, "result") == [False]
    assert "was not found in the value set" in out(outside, "message")[0]
    wrong_display = fhir.post("ValueSet/$validate-code", content=params(
        ("url", "valueUri", vs_url), ("coding", "valueCoding", {"system": url, "code": "a1", "display": "Nope"})), headers=FHIR_JSON).json()
    assert out(wrong_display, "result") == [False]
    issue = next(p for p in wrong_display["parameter"] if p["name"] == "issues")["resource"]["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "invalid-display"

    subsumes = fhir.get("CodeSystem/$subsumes", params={"system": url, "codeA": "a", "codeB": "a2"}).json()
    assert out(subsumes, "outcome") == ["subsumes"]
    reverse = fhir.get("CodeSystem/$subsumes", params={"system": url, "codeA": "a2", "codeB": "a"}).json()
    assert out(reverse, "outcome") == ["subsumed-by"]


def test_translate_forward_reverse_depends_on_and_unmapped(fhir):
    cm_url = f"http://example.org/cm/{uuid.uuid4()}"
    cm = {"resourceType": "ConceptMap", "url": cm_url, "version": "2", "status": "active", "group": [{
        "source": "http://example.org/local", "target": "http://loinc.org",
        "element": [
            {"code": "K", "target": [{"code": "2823-3", "equivalence": "equivalent"}]},
            {"code": "NA", "target": [{"code": "2951-2", "equivalence": "equivalent",
                                       "dependsOn": [{"property": "specimen", "value": "serum"}]}]},
        ],
        "unmapped": {"mode": "fixed", "code": "unknown", "display": "Unknown"},
    }]}
    created = fhir.post("ConceptMap", content=json.dumps(cm), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    forward = fhir.get("ConceptMap/$translate", params={"system": "http://example.org/local", "code": "K", "targetsystem": "http://loinc.org"}).json()
    assert out(forward, "result") == [True]
    match = next(p for p in forward["parameter"] if p["name"] == "match")
    parts = {p["name"]: p for p in match["part"]}
    assert parts["concept"]["valueCoding"] == {"system": "http://loinc.org", "code": "2823-3"}
    assert parts["equivalence"]["valueCode"] == "equivalent"
    assert parts["originMap"]["valueCanonical"] == f"{cm_url}|2"

    back = fhir.get("ConceptMap/$translate", params={"system": "http://loinc.org", "code": "2823-3", "reverse": "true"}).json()
    source = next(p for p in next(p for p in back["parameter"] if p["name"] == "match")["part"] if p["name"] == "source")
    assert source["valueCoding"]["code"] == "K"

    no_dependency = fhir.get(f"ConceptMap/{created.json()['id']}/$translate", params={"system": "http://example.org/local", "code": "NA"}).json()
    assert [p["valueCode"] for m in no_dependency["parameter"] if m["name"] == "match" for p in m["part"] if p["name"] == "equivalence"] == ["inexact"]
    with_dependency = fhir.post(f"ConceptMap/{created.json()['id']}/$translate", content=json.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "system", "valueUri": "http://example.org/local"}, {"name": "code", "valueCode": "NA"},
        {"name": "dependency", "part": [{"name": "element", "valueUri": "specimen"}, {"name": "concept", "valueCodeableConcept": {"text": "x"}}]},
    ]}), headers=FHIR_JSON).json()
    assert out(with_dependency, "result") == [True] or any(m["name"] == "match" for m in with_dependency["parameter"])


def test_ucum_is_a_grammar_not_a_list(fhir):
    good = fhir.get("CodeSystem/$validate-code", params={"url": "http://unitsofmeasure.org", "code": "mg/dL"}).json()
    assert out(good, "result") == [True]
    bad = fhir.get("CodeSystem/$validate-code", params={"url": "http://unitsofmeasure.org", "code": "mg//dL"}).json()
    assert out(bad, "result") == [False]
    looked = fhir.get("CodeSystem/$lookup", params={"system": "http://unitsofmeasure.org", "code": "mg/dL"}).json()
    canonical = [p for p in looked["parameter"] if p["name"] == "property"]
    assert any(part.get("valueString", "").endswith("kilogram / meter ** 3") for p in canonical for part in p["part"])


def test_ucum_exponents_past_99_are_not_units_this_server_computes(fhir):
    """pint computes `10*N` exactly: unbounded, `10*3000001` took 1.4 s and then failed to
    print as a float (a 500), larger ones held a worker for minutes."""
    ucum = "http://unitsofmeasure.org"
    for code in ("10*400", "10*3000001"):
        looked = fhir.get("CodeSystem/$lookup", params={"system": ucum, "code": code}, timeout=10)
        assert looked.status_code == 404, looked.text
        checked = fhir.get("CodeSystem/$validate-code", params={"url": ucum, "code": code}, timeout=10)
        assert checked.status_code == 200 and out(checked.json(), "result") == [False], checked.text
    looked = fhir.get("CodeSystem/$lookup", params={"system": ucum, "code": "10*12/L"}).json()
    canonical = [part.get("valueString") for p in looked["parameter"] if p["name"] == "property" for part in p["part"]]
    assert "1e+15 1 / meter ** 3" in canonical


def test_bad_input_gets_operation_outcomes(fhir):
    unknown = fhir.get("ValueSet/$expand", params={"url": "http://example.org/no-such-vs"})
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
    assert fhir.get("ValueSet/$expand", params={"url": "http://example.org/x", "count": "many"}).status_code == 400
    assert fhir.get("CodeSystem/$lookup", params={"system": "http://loinc.org"}).status_code == 400
    not_json = fhir.post("ValueSet/$expand", content=b"{not json", headers=FHIR_JSON)
    assert not_json.status_code == 400
    wrong_type = fhir.post("ValueSet/$expand", content=params(("valueSet", "valueString", "x")), headers=FHIR_JSON)
    assert wrong_type.status_code == 400
    injection = fhir.get("CodeSystem/$lookup", params={"system": "http://unitsofmeasure.org|2.1", "code": '{"$gt": ""}'})
    assert injection.status_code == 404
    operator = fhir.post("CodeSystem/$lookup", content=params(("coding", "valueCoding", {"system": "http://loinc.org", "code": {"$gt": ""}})), headers=FHIR_JSON)
    assert operator.status_code == 400 and operator.json()["resourceType"] == "OperationOutcome"
    url = f"http://example.org/cs/{uuid.uuid4()}"
    fhir.post("CodeSystem", content=json.dumps(code_system(url)), headers=FHIR_JSON)
    bad_regex = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [
        {"system": url, "filter": [{"property": "code", "op": "regex", "value": "(unclosed"}]}]}}
    refused = fhir.post("ValueSet/$expand", content=json.dumps({"resourceType": "Parameters", "parameter": [{"name": "valueSet", "resource": bad_regex}]}), headers=FHIR_JSON)
    assert refused.status_code == 400
    assert refused.json()["issue"][0]["details"]["coding"][0]["code"] == "vs-invalid"
    no_value = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [
        {"system": url, "filter": [{"property": "concept", "op": "is-a", "value": ""}]}]}}
    assert fhir.post("ValueSet/$expand", content=json.dumps({"resourceType": "Parameters", "parameter": [{"name": "valueSet", "resource": no_value}]}), headers=FHIR_JSON).status_code == 400


def test_operations_are_in_the_capability_statement(fhir):
    statement = fhir.get("metadata").json()
    by_type = {r["type"]: {o["name"] for o in r.get("operation", [])} for r in statement["rest"][0]["resource"]}
    assert {"lookup", "validate-code", "subsumes"} <= by_type["CodeSystem"]
    assert {"expand", "validate-code"} <= by_type["ValueSet"]
    assert "translate" in by_type["ConceptMap"]


def test_closure_table_grows_and_resyncs(fhir, loaded):
    name = f"closure-{uuid.uuid4()}"
    snomed = "http://snomed.info/sct"
    version = "http://snomed.info/sct/900000000000207008/version/20240101"

    def closure(*concepts: str, since: str | None = None) -> dict:
        parameters = [{"name": "name", "valueString": name}]
        parameters += [{"name": "concept", "valueCoding": {"system": snomed, "version": version, "code": c}} for c in concepts]
        if since is not None:
            parameters.append({"name": "version", "valueString": since})
        response = fhir.post("$closure", content=json.dumps({"resourceType": "Parameters", "parameter": parameters}), headers=FHIR_JSON)
        assert response.status_code == 200, response.text
        return response.json()

    assert closure()["version"] == "0"
    first = closure("73211009")
    assert first["version"] == "1" and not first["group"]
    second = closure("44054006", "404684003")
    links = {(e["code"], e["target"][0]["code"]) for g in second["group"] for e in g["element"]}
    assert links == {("44054006", "73211009"), ("44054006", "404684003"), ("73211009", "404684003")}
    assert all(e["target"][0]["equivalence"] == "subsumes" for g in second["group"] for e in g["element"])
    again = closure(since="1")
    assert {(e["code"], e["target"][0]["code"]) for g in again["group"] for e in g["element"]} == links
    assert fhir.get("$closure", params={"name": name}).status_code == 405
    unknown = fhir.post("$closure", content=params(("name", "valueString", f"never-{uuid.uuid4()}"), ("concept", "valueCoding", {"system": snomed, "code": "73211009"})), headers=FHIR_JSON)
    assert unknown.status_code == 404
    bad_version = fhir.post("$closure", content=params(("name", "valueString", name), ("version", "valueString", "²")), headers=FHIR_JSON)
    assert bad_version.status_code == 400


def test_naming_system_gives_a_code_system_another_name(fhir):
    url = f"http://example.org/cs/{uuid.uuid4()}"
    oid = f"urn:oid:2.999.{uuid.uuid4().int % 10**9}"
    fhir.post("CodeSystem", content=json.dumps(code_system(url)), headers=FHIR_JSON)
    naming = {"resourceType": "NamingSystem", "name": "Test", "status": "active", "kind": "codesystem", "date": "2024-01-01",
              "uniqueId": [{"type": "uri", "value": url, "preferred": True}, {"type": "oid", "value": oid.removeprefix("urn:oid:")}, {"type": "other", "value": oid}]}
    assert fhir.post("NamingSystem", content=json.dumps(naming), headers=FHIR_JSON).status_code == 201
    looked = fhir.get("CodeSystem/$lookup", params={"system": oid, "code": "a1"})
    assert looked.status_code == 200, looked.text
    assert out(looked.json(), "display") == ["Alpha one"]


def test_terminology_capabilities(fhir, server):
    url = "http://example.org/fhir/CodeSystem/caps-test"
    system = {"resourceType": "CodeSystem", "url": url, "version": "3", "status": "active", "content": "complete",
              "concept": [{"code": "a"}]}
    assert fhir.post("CodeSystem", content=json.dumps(system), headers=FHIR_JSON).status_code == 201
    caps = fhir.get("metadata", params={"mode": "terminology"}).json()
    assert caps["resourceType"] == "TerminologyCapabilities"
    assert {"uri": url, "version": [{"code": "3"}]} in caps["codeSystem"]
    assert caps["implementation"]["url"] == server.fhir
    assert fhir.get("metadata", params={"mode": "normative"}).json()["resourceType"] == "CapabilityStatement"
    assert fhir.get("metadata", params={"mode": "nonsense"}).status_code == 400


def test_count_and_offset_beyond_a_fhir_integer_are_400(fhir):
    """A count past 64 bits reached MongoDB's limit (OverflowError, a 500), with or without an offset."""
    url = f"http://example.org/cs/{uuid.uuid4()}"
    fhir.post("CodeSystem", content=json.dumps(code_system(url)), headers=FHIR_JSON)
    vs_url = f"http://example.org/vs/{uuid.uuid4()}"
    vs = {"resourceType": "ValueSet", "url": vs_url, "status": "active", "compose": {"include": [{"system": url}]}}
    assert fhir.post("ValueSet", content=json.dumps(vs), headers=FHIR_JSON).status_code == 201
    for extra in ({"count": "99999999999999999999"}, {"count": "5", "offset": "99999999999999999999"},
                  {"count": "2147483648"}, {"offset": "2147483648"}):
        response = fhir.get("ValueSet/$expand", params={"url": vs_url, **extra})
        assert response.status_code == 400, (extra, response.text[:200])
        assert response.json()["resourceType"] == "OperationOutcome"
    assert fhir.get("ValueSet/$expand", params={"url": vs_url, "offset": "2147483647", "count": "2147483647"}).status_code == 200
