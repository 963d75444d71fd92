"""create, read, vread, update, delete: statuses, headers and error cases (http.html)."""

from __future__ import annotations

import time
from email.utils import format_datetime, parsedate_to_datetime

import orjson

from tests.fhir.helpers import FHIR_JSON, assert_outcome, created, patient, post, put


def test_create_assigns_id_and_meta_and_returns_headers(fhir, server):
    response = post(fhir, "Patient", {**patient(), "id": "client-chosen", "meta": {"versionId": "7", "tag": [{"code": "t"}]}})
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["tag"] == [{"code": "t"}]
    assert body["meta"]["lastUpdated"].endswith("Z")
    location = f"{server.fhir}/Patient/{body['id']}/_history/1"
    assert response.headers["Location"] == location
    assert response.headers["Content-Location"] == location
    assert response.headers["ETag"] == 'W/"1"'
    assert parsedate_to_datetime(response.headers["Last-Modified"])


def test_stored_json_is_what_was_sent(fhir):
    sent = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"weight \xe4\xbd\x93\xe9\x87\x8d"},'
        b'"valueQuantity":{"value":72.50,"unit":"kg"},"component":[{"code":{"text":"x"},"valueInteger":3}]}'
    )
    response = fhir.post("Observation", content=sent, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    body = fhir.get(f"Observation/{response.json()['id']}").content
    assert b'"value":72.50' in body
    # Everything after the server-set id and meta is the sent JSON, byte for byte.
    assert body.endswith(sent[sent.index(b'"status"') - 1 :].lstrip(b","))
    assert body.index(b'"status"') < body.index(b'"code"') < body.index(b'"valueQuantity"')


def test_pretty_printed_input_is_stored_compact(fhir):
    response = fhir.post("Patient", content=b'{\n  "resourceType": "Patient",\n  "active": true\n}', headers=FHIR_JSON)
    assert response.status_code == 201
    assert b"\n" not in fhir.get(f"Patient/{response.json()['id']}").content


def test_read_vread_and_their_headers(fhir, server):
    body = created(fhir, "Patient", patient())
    read = fhir.get(f"Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body
    assert read.headers["ETag"] == 'W/"1"'
    assert read.headers["Content-Location"] == f"{server.fhir}/Patient/{body['id']}/_history/1"
    assert read.headers["content-type"] == "application/fhir+json; charset=utf-8"
    vread = fhir.get(f"Patient/{body['id']}/_history/1")
    assert vread.status_code == 200 and vread.content == read.content


def test_read_unknown_and_invalid(fhir):
    assert_outcome(fhir.get("Patient/does-not-exist"), 404, "not-found")
    assert_outcome(fhir.get("Patient/bad$id"), 400)
    assert_outcome(fhir.get("Patient/" + "x" * 65), 400)
    assert_outcome(fhir.get("NotAType/1"), 404, "not-supported")
    body = created(fhir, "Patient", patient())
    assert_outcome(fhir.get(f"Patient/{body['id']}/_history/2"), 404)
    assert_outcome(fhir.get(f"Patient/{body['id']}/_history/abc"), 404)
    assert_outcome(fhir.get(f"Patient/{body['id']}/_history/99999999999999999999999"), 404)


def test_conditional_read(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    assert fhir.get(path, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert fhir.get(path, headers={"If-None-Match": 'W/"2"'}).status_code == 200
    last_modified = fhir.get(path).headers["Last-Modified"]
    assert fhir.get(path, headers={"If-Modified-Since": last_modified}).status_code == 304
    earlier = format_datetime(parsedate_to_datetime(last_modified).replace(year=2000), usegmt=True)
    assert fhir.get(path, headers={"If-Modified-Since": earlier}).status_code == 200


def test_update_versions_and_update_as_create(fhir, server):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    changed = {**body, "active": True}
    response = put(fhir, path, changed)
    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"
    assert response.headers["ETag"] == 'W/"2"'
    assert response.json()["active"] is True
    assert fhir.get(f"{path}/_history/1").json()["meta"]["versionId"] == "1"

    client_id = f"client-{time.time_ns()}"
    response = put(fhir, f"Patient/{client_id}", {**patient(), "id": client_id})
    assert response.status_code == 201
    assert response.headers["Location"] == f"{server.fhir}/Patient/{client_id}/_history/1"


def test_update_errors(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    assert_outcome(put(fhir, path, patient()), 400, "required")  # no id
    assert_outcome(put(fhir, path, {**patient(), "id": "other"}), 400)
    assert_outcome(put(fhir, f"Observation/{body['id']}", body), 400)
    assert_outcome(put(fhir, path, body, **{"If-Match": 'W/"5"'}), 412, "conflict")
    assert_outcome(put(fhir, path, body, **{"If-Match": "garbage"}), 400)
    assert put(fhir, path, body, **{"If-Match": 'W/"1"'}).status_code == 200
    assert_outcome(put(fhir, "Patient/new-one-412", {**patient(), "id": "new-one-412"}, **{"If-Match": 'W/"1"'}), 412)


def test_delete_is_logical_and_versioned(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    assert_outcome(fhir.delete(path, headers={"If-Match": 'W/"3"'}), 412)
    deleted = fhir.delete(path)
    assert deleted.status_code == 204
    assert deleted.headers["ETag"] == 'W/"2"'
    assert_outcome(fhir.get(path), 410, "deleted")
    assert_outcome(fhir.get(f"{path}/_history/2"), 410)
    assert fhir.get(f"{path}/_history/1").status_code == 200
    assert fhir.delete(path).status_code == 204  # deleting again is not an error
    assert fhir.delete("Patient/never-existed").status_code == 204
    history = fhir.get(f"{path}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    # Re-creating by update continues the version sequence.
    again = put(fhir, path, body)
    assert again.status_code == 201
    assert again.json()["meta"]["versionId"] == "3"


def test_prefer_return(fhir):
    minimal = post(fhir, "Patient", patient(), Prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["Location"]
    outcome = post(fhir, "Patient", patient(), Prefer="return=OperationOutcome")
    assert outcome.status_code == 201 and outcome.json()["resourceType"] == "OperationOutcome"
    full = post(fhir, "Patient", patient(), Prefer="return=representation")
    assert full.json()["resourceType"] == "Patient"


def test_content_negotiation(fhir):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    assert_outcome(fhir.get(path, params={"_format": "xml"}), 406, "not-supported")
    assert_outcome(fhir.get(path, headers={"Accept": "application/fhir+xml"}), 406)
    assert fhir.get(path, params={"_format": "json"}).status_code == 200
    as_json = fhir.get(path, headers={"Accept": "application/json"})
    assert as_json.headers["content-type"].startswith("application/json")
    assert fhir.get(path, headers={"Accept": "text/html, application/fhir+json;q=0.9"}).status_code == 200
    pretty = fhir.get(path, params={"_pretty": "true"})
    assert pretty.content.startswith(b'{\n  "resourceType"')
    assert orjson.loads(pretty.content) == body


def test_bad_request_bodies(fhir):
    assert_outcome(fhir.post("Patient", content=b'{"resourceType": "Patient",', headers=FHIR_JSON), 400, "invalid")
    assert_outcome(fhir.post("Patient", content=b"[1,2]", headers=FHIR_JSON), 400, "structure")
    assert_outcome(fhir.post("Patient", content=b"", headers=FHIR_JSON), 400)
    assert_outcome(fhir.post("Patient", content=b'{"active": true}', headers=FHIR_JSON), 400, "required")
    assert_outcome(fhir.post("Patient", content=b"\xff\xfe{}", headers=FHIR_JSON), 400)
    assert_outcome(fhir.post("Patient", content=b'{"resourceType":"Patient","x":NaN}', headers=FHIR_JSON), 400)
    assert_outcome(fhir.post("Patient", content=b"[" * 100_000, headers=FHIR_JSON), 400)
    assert_outcome(post(fhir, "Patient", {"resourceType": "Observation", "status": "final", "code": {}}), 400)
    assert_outcome(fhir.post("Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}), 415)
    assert_outcome(fhir.post("Patient", content=b"{}", headers={"Content-Type": "text/plain"}), 415)
    assert_outcome(fhir.post("Patient", content=b"{}", headers={"Content-Type": ""}), 415)


def test_validation_errors_carry_expressions(fhir):
    response = post(fhir, "Patient", {"resourceType": "Patient", "birthDate": "2020-13-45", "name": [{"given": [1]}], "unknownThing": 1})
    body = assert_outcome(response, 400)
    expressions = {e for issue in body["issue"] for e in issue.get("expression", [])}
    assert {"Patient.birthDate", "Patient.name[0].given[0]", "Patient.unknownThing"} <= expressions
    bad_reference = post(fhir, "Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/has space"}})
    assert_outcome(bad_reference, 400)


def test_injection_attempts_are_data(fhir, db):
    before = db.fhir_resources.count_documents({})
    assert_outcome(fhir.get('Patient/{"$gt":""}'), 400)
    assert_outcome(fhir.get("Patient/$where"), 404)  # an unknown operation, not an id
    assert_outcome(fhir.get("Patient/..%2F..%2Fetc"), 404)  # no route matches a path with slashes
    body = created(fhir, "Patient", patient(family='{"$where": "sleep(1000)"}'))
    assert fhir.get(f"Patient/{body['id']}").json()["name"][0]["family"] == '{"$where": "sleep(1000)"}'
    assert db.fhir_resources.count_documents({}) == before + 1


def test_non_ascii_digits_are_not_numbers(fhir):
    body = created(fhir, "Patient", patient())
    assert_outcome(fhir.get(f"Patient/{body['id']}/_history/²"), 404)
    assert_outcome(put(fhir, f"Patient/{body['id']}", body, **{"If-Match": 'W/"²"'.encode('latin-1')}), 400)
    assert_outcome(fhir.get("_history", params={"_count": "٣"}), 400)


def test_read_and_vread_honour_summary_and_elements(fhir):
    """http.html#read takes _summary and _elements; the result is tagged SUBSETTED."""
    subsetted = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
    body = created(fhir, "Patient", patient(gender="female", birthDate="1970-01-01", active=True,
                                            text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
                                            maritalStatus={"text": "M"}))
    for path in (f"Patient/{body['id']}", f"Patient/{body['id']}/_history/1"):
        summary = fhir.get(path, params={"_summary": "true"}).json()
        assert summary["gender"] == "female" and "maritalStatus" not in summary and "text" not in summary
        assert subsetted in summary["meta"]["tag"]
        elements = fhir.get(path, params={"_elements": "birthDate,active"}).json()
        assert set(elements) == {"resourceType", "id", "meta", "birthDate", "active"} and subsetted in elements["meta"]["tag"]
        data = fhir.get(path, params={"_summary": "data"}).json()
        assert "text" not in data and data["maritalStatus"] == {"text": "M"}
        assert set(fhir.get(path, params={"_summary": "text"}).json()) == {"resourceType", "id", "meta", "text"}
        assert fhir.get(path, params={"_summary": "false"}).json() == body
        assert_outcome(fhir.get(path, params={"_summary": "some"}), 400, "value")
        assert_outcome(fhir.get(path, params={"_elements": "$where"}), 400, "value")
    assert fhir.get(f"Patient/{body['id']}").json() == body


def test_if_match_star_matches_any_current_version(fhir):
    """RFC 7232 3.1: `If-Match: *` holds when the resource has a current version."""
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    star = {"If-Match": "*"}
    assert put(fhir, path, body, **star).json()["meta"]["versionId"] == "2"
    patched = fhir.patch(path, content=b'[{"op":"add","path":"/active","value":true}]',
                         headers={"Content-Type": "application/json-patch+json", **star})
    assert patched.status_code == 200 and patched.json()["meta"]["versionId"] == "3"
    assert fhir.delete(path, headers=star).status_code == 204
    assert_outcome(put(fhir, path, body, **star), 412, "conflict")  # deleted: no current version
    missing = f"star-{body['id'][:8]}"
    assert_outcome(put(fhir, f"Patient/{missing}", {**patient(), "id": missing}, **star), 412, "conflict")


def test_accept_with_zero_quality_is_not_acceptable(fhir):
    """RFC 9110 12.4.2: q=0, in any spelling, means "not acceptable"."""
    path = f"Patient/{created(fhir, 'Patient', patient())['id']}"
    for refused in ("application/fhir+json;q=0", "application/fhir+json;q=0.0", "application/fhir+json; q=0.000", "*/*;q=0.00"):
        assert_outcome(fhir.get(path, headers={"Accept": refused}), 406, "not-supported")
        as_json = fhir.get(path, headers={"Accept": f"{refused}, application/json;q=0.5"})
        assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    assert fhir.get(path, headers={"Accept": "application/fhir+json;q=0.01"}).status_code == 200
