"""$validate, $meta, $meta-add, $meta-delete."""

from __future__ import annotations

import orjson

from tests.fhir.helpers import FHIR_JSON, assert_outcome, created, patient


def parameters(*items: dict) -> bytes:
    return orjson.dumps({"resourceType": "Parameters", "parameter": list(items)})


def test_validate_type_level(fhir, db):
    before = db.fhir_resources.count_documents({})
    ok = fhir.post("Patient/$validate", content=orjson.dumps(patient()), headers=FHIR_JSON)
    assert ok.status_code == 200
    assert ok.json()["issue"][0]["severity"] == "information"
    bad = fhir.post("Patient/$validate", content=orjson.dumps({"resourceType": "Patient", "birthDate": "x"}), headers=FHIR_JSON)
    assert bad.status_code == 200
    assert any("Patient.birthDate" in i.get("expression", []) for i in bad.json()["issue"])
    wrapped = fhir.post(
        "Patient/$validate",
        content=parameters({"name": "resource", "resource": patient()}, {"name": "mode", "valueCode": "create"}),
        headers=FHIR_JSON,
    )
    assert wrapped.json()["issue"][0]["severity"] == "information"
    wrong_type = fhir.post("Patient/$validate", content=orjson.dumps({"resourceType": "Organization"}), headers=FHIR_JSON)
    assert wrong_type.json()["issue"][0]["severity"] == "error"
    assert db.fhir_resources.count_documents({}) == before  # validation stores nothing


def test_validate_instance_level_modes(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}/$validate"
    assert fhir.post(path, content=orjson.dumps(body), headers=FHIR_JSON).json()["issue"][0]["severity"] == "information"
    mismatch = fhir.post(path, content=orjson.dumps({**body, "id": "other"}), headers=FHIR_JSON)
    assert mismatch.json()["issue"][0]["severity"] == "error"
    delete_mode = fhir.post(path, content=parameters({"name": "mode", "valueCode": "delete"}), headers=FHIR_JSON)
    assert delete_mode.json()["issue"][0]["severity"] == "information"
    assert_outcome(fhir.post("Patient/gone-missing/$validate", content=parameters({"name": "mode", "valueCode": "delete"}), headers=FHIR_JSON), 404)
    assert_outcome(fhir.post(path, content=parameters({"name": "mode", "valueCode": "sideways"}), headers=FHIR_JSON), 400)


def test_meta_add_delete_and_read(fhir):
    body = created(fhir, "Patient", patient(meta={"tag": [{"system": "s", "code": "a"}]}))
    path = f"Patient/{body['id']}"
    add = fhir.post(
        f"{path}/$meta-add",
        content=parameters({"name": "meta", "valueMeta": {"tag": [{"system": "s", "code": "b"}, {"system": "s", "code": "a"}], "profile": ["http://p"]}}),
        headers=FHIR_JSON,
    )
    assert add.status_code == 200, add.text
    meta = add.json()["parameter"][0]["valueMeta"]
    assert [t["code"] for t in meta["tag"]] == ["a", "b"]
    assert meta["profile"] == ["http://p"]
    assert fhir.get(path).json()["meta"]["tag"] == meta["tag"]
    delete = fhir.post(f"{path}/$meta-delete", content=parameters({"name": "meta", "valueMeta": {"tag": [{"system": "s", "code": "a"}]}}), headers=FHIR_JSON)
    assert [t["code"] for t in delete.json()["parameter"][0]["valueMeta"]["tag"]] == ["b"]
    current = fhir.get(f"{path}/$meta").json()["parameter"][0]["valueMeta"]
    assert current["versionId"] == "3"
    first = fhir.get(f"{path}/_history/1/$meta").json()["parameter"][0]["valueMeta"]
    assert [t["code"] for t in first["tag"]] == ["a"]


def test_operation_errors(fhir):
    body = created(fhir, "Patient", patient())
    assert_outcome(fhir.get(f"Patient/{body['id']}/$meta-add"), 405)
    assert_outcome(fhir.post(f"Patient/{body['id']}/$meta-add", content=parameters(), headers=FHIR_JSON), 400)
    assert_outcome(fhir.post("Patient/$meta-add", content=parameters(), headers=FHIR_JSON), 400)
    assert_outcome(fhir.get("Patient/$frobnicate"), 404)
    assert_outcome(fhir.post("Patient/$validate", content=b"[]", headers=FHIR_JSON), 400)


def test_malformed_parameters_body_is_a_400(fhir):
    """A Parameters body whose `parameter` or `part` is not a list of named objects."""
    body = created(fhir, "Patient", patient())
    for malformed in (
        b'{"resourceType":"Parameters","parameter":"x"}',
        b'{"resourceType":"Parameters","parameter":[1]}',
        b'{"resourceType":"Parameters","parameter":[{"valueString":"no name"}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"meta","part":"x"}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"meta","part":[["nested"]]}]}',
        # values and inline resources not shaped as R4 shapes them (each was a 500 somewhere)
        b'{"resourceType":"Parameters","parameter":[{"name":"meta","valueMeta":{"tag":"x"}}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"meta","valueMeta":{"tag":[{"system":"s","code":"c"},null]}}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"valueSet","resource":{"resourceType":"ValueSet","compose":"x"}}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"valueSet","resource":{"resourceType":"ValueSet",'
        b'"status":"active","compose":{"include":[{"system":"http://loinc.org","concept":["x"]}]}}}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"valueSet","resource":{"resourceType":"ValueSet",'
        b'"status":"active","expansion":{"timestamp":"2024-01-01","contains":[null]}}}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"conceptMap","resource":{"resourceType":"ConceptMap",'
        b'"status":"active","group":"x"}},{"name":"system","valueUri":"http://loinc.org"},{"name":"code","valueCode":"x"}]}',
        b'{"resourceType":"Parameters","parameter":[{"name":"url","valueUri":"http://example.org/vs"},'
        b'{"name":"tx-resource","resource":{"resourceType":"CodeSystem","status":"active","content":"complete","concept":"x"}}]}',
    ):
        for path in ("Patient/$validate", f"Patient/{body['id']}/$meta-add", "CodeSystem/$lookup",
                     "ValueSet/$expand", "ConceptMap/$translate", "$closure"):
            assert_outcome(fhir.post(path, content=malformed, headers=FHIR_JSON), 400)
    assert fhir.get(f"Patient/{body['id']}").json()["meta"]["versionId"] == "1"
