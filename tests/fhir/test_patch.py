"""PATCH with JSON Patch and FHIRPath Patch, honouring If-Match."""

from __future__ import annotations

import orjson

from tests.fhir.helpers import FHIR_JSON, assert_outcome, created, patient

JSON_PATCH = {"Content-Type": "application/json-patch+json"}


def operation(kind: str, path: str, **parts: object) -> dict:
    part = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    for name, value in parts.items():
        if name == "value_parts":
            part.append({"name": "value", "part": value})
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)).startswith("value"):
            part.append({"name": name, **value})
        else:
            part.append({"name": name, "valueInteger" if isinstance(value, int) else "valueString": value})
    return {"name": "operation", "part": part}


def fhirpath_patch(fhir, path: str, *operations: dict, **headers: str):
    body = {"resourceType": "Parameters", "parameter": list(operations)}
    return fhir.patch(path, content=orjson.dumps(body), headers={**FHIR_JSON, **headers})


def test_json_patch(fhir):
    body = created(fhir, "Patient", patient(extension=[{"url": "http://x", "valueDecimal": 1.5}]))
    path = f"Patient/{body['id']}"
    ops = [{"op": "replace", "path": "/name/0/family", "value": "Patched"}, {"op": "add", "path": "/active", "value": True}]
    response = fhir.patch(path, content=orjson.dumps(ops), headers=JSON_PATCH)
    assert response.status_code == 200, response.text
    assert response.json()["name"][0]["family"] == "Patched"
    assert response.json()["meta"]["versionId"] == "2"
    assert fhir.get(path).json()["active"] is True


def test_json_patch_keeps_decimal_precision(fhir):
    raw = b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":5.10}}'
    body = fhir.post("Observation", content=raw, headers=FHIR_JSON).json()
    response = fhir.patch(f"Observation/{body['id']}", content=b'[{"op":"replace","path":"/status","value":"amended"}]', headers=JSON_PATCH)
    assert b'"value":5.10' in response.content


def test_json_patch_errors(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    assert_outcome(fhir.patch(path, content=b'{"op":"add"}', headers=JSON_PATCH), 400)
    assert_outcome(fhir.patch(path, content=b'[{"op":"explode","path":"/x"}]', headers=JSON_PATCH), 400)
    assert_outcome(fhir.patch(path, content=b'[{"op":"test","path":"/active","value":true}]', headers=JSON_PATCH), 422)
    assert_outcome(fhir.patch(path, content=b'[{"op":"remove","path":"/nothing/here"}]', headers=JSON_PATCH), 422)
    assert_outcome(fhir.patch(path, content=b'[{"op":"replace","path":"/id","value":"other"}]', headers=JSON_PATCH), 400)
    assert_outcome(fhir.patch(path, content=b'[{"op":"add","path":"/birthDate","value":"not-a-date"}]', headers=JSON_PATCH), 400)
    assert_outcome(fhir.patch(path, content=b'[]', headers={**JSON_PATCH, "If-Match": 'W/"9"'}), 412)
    assert_outcome(fhir.patch("Patient/absent", content=b'[]', headers=JSON_PATCH), 404)
    assert_outcome(fhir.patch(path, content=b"[]", headers={"Content-Type": "text/plain"}), 415)
    assert fhir.get(path).json()["meta"]["versionId"] == "1"  # nothing was written
    assert fhir.patch(path, content=b"[]", headers={**JSON_PATCH, "If-Match": 'W/"1"'}).status_code == 200


def test_fhirpath_patch_operations(fhir):
    body = created(
        fhir,
        "Patient",
        patient(
            identifier=[{"system": "a", "value": "1"}, {"system": "b", "value": "2"}, {"system": "c", "value": "3"}],
            telecom=[{"system": "phone", "value": "555"}],
        ),
    )
    path = f"Patient/{body['id']}"
    response = fhirpath_patch(
        fhir,
        path,
        operation("add", "Patient", name="birthDate", value={"valueDate": "1970-01-01"}),
        operation("add", "Patient.name[0]", name="given", value={"valueString": "Ann"}),
        operation("replace", "Patient.telecom.where(system = 'phone').value", value={"valueString": "999"}),
        operation("delete", "Patient.identifier.where(system = 'b')"),
        operation("insert", "Patient.identifier", index=0, value={"valueIdentifier": {"system": "z", "value": "0"}}),
        operation("move", "Patient.identifier", source=2, destination=1),
        operation("add", "Patient", name="contact", value_parts=[{"name": "name", "valueHumanName": {"text": "Kin"}}]),
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["birthDate"] == "1970-01-01"
    assert result["name"][0]["given"] == ["Ann"]
    assert result["telecom"][0]["value"] == "999"
    assert [i["system"] for i in result["identifier"]] == ["z", "c", "a"]
    assert result["contact"] == [{"name": {"text": "Kin"}}]


def test_fhirpath_patch_delete_of_absent_element_is_a_no_op(fhir):
    body = created(fhir, "Patient", patient())
    response = fhirpath_patch(fhir, f"Patient/{body['id']}", operation("delete", "Patient.birthDate"))
    assert response.status_code == 200


def test_fhirpath_patch_errors(fhir):
    body = created(fhir, "Patient", patient(identifier=[{"system": "a"}, {"system": "a"}]))
    path = f"Patient/{body['id']}"
    assert_outcome(fhirpath_patch(fhir, path, operation("explode", "Patient")), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("replace", "Patient.identifier", value={"valueString": "x"})), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("add", "Patient", name="birthDate", value={"valueDate": "x"})), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("add", "Patient", name="notAnElement", value={"valueString": "x"})), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("replace", "Observation.status", value={"valueCode": "x"})), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("insert", "Patient.identifier", index=9, value={"valueIdentifier": {}})), 400)
    assert_outcome(fhirpath_patch(fhir, path, operation("replace", "Patient.name.where(", value={"valueString": "x"})), 400)
    assert_outcome(fhir.patch(path, content=b'{"resourceType":"Parameters","parameter":[{"name":"x"}]}', headers=FHIR_JSON), 400)
    assert fhir.get(path).json()["meta"]["versionId"] == "1"


def test_json_merge_patch(fhir):
    body = created(fhir, "Patient", patient(active=False, gender="female"))
    path = f"Patient/{body['id']}"
    response = fhir.patch(path, content=b'{"active":true,"gender":null}', headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True and "gender" not in response.json()
    # fhirpy sends a partial resource as application/json: read as a merge patch too.
    response = fhir.patch(path, content=b'{"birthDate":"1999-09-09"}', headers={"Content-Type": "application/json"})
    assert response.json()["birthDate"] == "1999-09-09"
    assert_outcome(fhir.patch(path, content=b'{"birthDate":"soon"}', headers={"Content-Type": "application/merge-patch+json"}), 400)
    assert_outcome(fhir.patch(path, content=b'[1]', headers={"Content-Type": "application/merge-patch+json"}), 400)


def test_json_patch_replacing_the_whole_document_with_a_non_object_is_a_400(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    for value in (b"[]", b"7", b'"text"', b"null"):
        ops = b'[{"op":"replace","path":"","value":' + value + b"}]"
        assert_outcome(fhir.patch(path, content=ops, headers=JSON_PATCH), 400)
    assert fhir.get(path).json()["meta"]["versionId"] == "1"  # nothing was written
