"""Conditional create, update and delete, alone and in transactions (http.html)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.fhir.helpers import FHIR_JSON, assert_outcome


def _patient(system: str, value: str, **more) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **more}


def _count(fhir, system: str, value: str) -> int:
    return fhir.get("Patient", params={"identifier": f"{system}|{value}", "_summary": "count"}).json()["total"]


def test_conditional_create(fhir):
    system, value = f"urn:cc:{uuid.uuid4().hex}", "1"
    criteria = {"If-None-Exist": f"identifier={system}|{value}", **FHIR_JSON}
    first = fhir.post("Patient", json=_patient(system, value), headers=criteria)
    assert first.status_code == 201, first.text
    again = fhir.post("Patient", json=_patient(system, value), headers=criteria)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    fhir.post("Patient", json=_patient(system, value), headers=FHIR_JSON)  # a duplicate, unconditionally
    ambiguous = fhir.post("Patient", json=_patient(system, value), headers=criteria)
    assert ambiguous.status_code == 412
    bad = fhir.post("Patient", json=_patient(system, value), headers={"If-None-Exist": "nonsense=1", **FHIR_JSON})
    assert bad.status_code == 400


def test_fifty_concurrent_conditional_creates_make_one_resource(server, fhir):
    system, value = f"urn:race:{uuid.uuid4().hex}", "same"
    headers = {"If-None-Exist": f"identifier={system}|{value}", **FHIR_JSON}

    def attempt(_: int) -> int:
        with httpx.Client(base_url=server.fhir + "/", timeout=120) as client:
            return client.post("Patient", json=_patient(system, value), headers=headers).status_code

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(attempt, range(50)))
    assert sorted(statuses) == [200] * 49 + [201]
    assert _count(fhir, system, value) == 1


def test_conditional_update(fhir):
    system = f"urn:cu:{uuid.uuid4().hex}"
    url = f"Patient?identifier={system}|1"
    created = fhir.put(url, json=_patient(system, "1", gender="male"), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    id_ = created.json()["id"]
    updated = fhir.put(url, json=_patient(system, "1", gender="female"), headers=FHIR_JSON)
    assert updated.status_code == 200 and updated.json()["id"] == id_ and updated.json()["meta"]["versionId"] == "2"
    wrong_id = fhir.put(url, json={**_patient(system, "1"), "id": "other"}, headers=FHIR_JSON)
    assert wrong_id.status_code == 400
    fhir.post("Patient", json=_patient(system, "1"), headers=FHIR_JSON)
    assert fhir.put(url, json=_patient(system, "1"), headers=FHIR_JSON).status_code == 412
    assert fhir.put("Patient", json=_patient(system, "1"), headers=FHIR_JSON).status_code == 400  # no criteria


def test_conditional_delete_single_and_multiple(fhir):
    system = f"urn:cd:{uuid.uuid4().hex}"
    for value in ("1", "2", "2"):
        fhir.post("Patient", json=_patient(system, value), headers=FHIR_JSON)
    one = fhir.delete(f"Patient?identifier={system}|1")
    assert one.status_code == 204 and one.headers["X-Deleted-Count"] == "1"
    assert _count(fhir, system, "1") == 0
    many = fhir.delete(f"Patient?identifier={system}|2")
    assert many.status_code == 204 and many.headers["X-Deleted-Count"] == "2"
    assert _count(fhir, system, "2") == 0
    none = fhir.delete(f"Patient?identifier={system}|3")
    assert none.status_code == 204 and none.headers["X-Deleted-Count"] == "0"


def test_transactions_with_if_none_exist_conditional_urls_and_references(fhir):
    system = f"urn:tx:{uuid.uuid4().hex}"
    existing = fhir.post("Patient", json=_patient(system, "known"), headers=FHIR_JSON).json()["id"]
    bundle = {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:a", "resource": _patient(system, "known"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|known"}},
            {"fullUrl": "urn:uuid:b", "resource": _patient(system, "new"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|new"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "urn:uuid:a"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "y"},
                          "subject": {"reference": f"Patient?identifier={system}|known"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": _patient(system, "put", gender="other"),
             "request": {"method": "PUT", "url": f"Patient?identifier={system}|put"}},
        ],
    }
    response = fhir.post(str(fhir.base_url).rstrip("/"), json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert entries[0]["response"]["status"].startswith("200")
    assert entries[0]["response"]["location"].startswith(f"Patient/{existing}/")
    assert entries[1]["response"]["status"].startswith("201")
    assert entries[4]["response"]["status"].startswith("201")
    for index in (2, 3):
        observation = fhir.get(entries[index]["response"]["location"]).json()
        assert observation["subject"]["reference"] == f"Patient/{existing}"
    # run again: everything conditional now matches
    again = fhir.post(str(fhir.base_url).rstrip("/"), json=bundle, headers=FHIR_JSON).json()["entry"]
    assert again[1]["response"]["status"].startswith("200") and again[4]["response"]["status"].startswith("200")
    assert _count(fhir, system, "new") == 1 and _count(fhir, system, "put") == 1


def test_transaction_conditional_reference_must_match_one(fhir):
    bundle = {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                "subject": {"reference": f"Patient?identifier=urn:none|{uuid.uuid4().hex}"}},
                   "request": {"method": "POST", "url": "Observation"}}],
    }
    response = fhir.post(str(fhir.base_url).rstrip("/"), json=bundle, headers=FHIR_JSON)
    assert response.status_code == 412 and "Bundle.entry[0]" in response.text


def test_result_parameters_are_not_criteria(fhir, db):
    """`_count`, `_sort`, `_summary`, ... select nothing: alone they are no condition (400),
    beside a criterion they leave its matches alone."""
    system = f"urn:rp:{uuid.uuid4().hex}"
    bystander = fhir.post("Patient", json=_patient(f"{system}:other", "1"), headers=FHIR_JSON).json()["id"]
    target = fhir.post("Patient", json=_patient(system, "1"), headers=FHIR_JSON).json()["id"]
    before = db.fhir_history.count_documents({})
    for query in ("_count=1", "_sort=_id", "_summary=count", "_total=accurate", "_elements=id",
                  "_include=Patient:organization", "_revinclude:iterate=Observation:subject", "_format=json&_pretty=true", ""):
        assert_outcome(fhir.delete(f"Patient?{query}"), 400, "invalid")
        assert_outcome(fhir.put(f"Patient?{query}", json=_patient(system, "1", gender="male"), headers=FHIR_JSON), 400, "invalid")
        assert_outcome(fhir.post("Patient", json=_patient(system, "1"), headers={"If-None-Exist": query, **FHIR_JSON}), 400, "invalid")
    assert db.fhir_history.count_documents({}) == before
    assert fhir.get(f"Patient/{bystander}").status_code == 200
    deleted = fhir.delete(f"Patient?_count=1&identifier={system}|1&_sort=_id")
    assert deleted.status_code == 204 and deleted.headers["X-Deleted-Count"] == "1"
    assert fhir.get(f"Patient/{target}").status_code == 410
    assert fhir.get(f"Patient/{bystander}").status_code == 200


def test_prefer_operation_outcome_of_a_matched_conditional_create(fhir):
    system = f"urn:oo:{uuid.uuid4().hex}"
    headers = {"If-None-Exist": f"identifier={system}|1", "Prefer": "return=OperationOutcome", **FHIR_JSON}
    first = fhir.post("Patient", json=_patient(system, "1"), headers=headers)
    assert first.status_code == 201 and "created as version 1" in first.json()["issue"][0]["diagnostics"]
    again = fhir.post("Patient", json=_patient(system, "1"), headers=headers)
    assert again.status_code == 200
    diagnostics = again.json()["issue"][0]["diagnostics"]
    assert "already exists" in diagnostics and "updated" not in diagnostics, diagnostics


def _bundle(kind: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _request(method: str, url: str, resource: dict | None = None) -> dict:
    item: dict = {"request": {"method": method, "url": url}}
    if resource is not None:
        item["resource"] = resource
    return item


def _ids(fhir, system: str, count: int, value: str = "1") -> list[str]:
    return [fhir.post("Patient", json=_patient(system, value), headers=FHIR_JSON).json()["id"] for _ in range(count)]


def test_transaction_conditional_delete_deletes_every_match(fhir):
    """conditionalDelete = multiple holds in a transaction too: every match is deleted, in
    the one database transaction, and the entry answers one 204 as the standalone route."""
    system = f"urn:txcd:{uuid.uuid4().hex}"
    doomed = _ids(fhir, system, 3)
    bystander = _ids(fhir, system, 1, "2")[0]
    marker = f"Marker-{uuid.uuid4().hex[:8]}"
    response = fhir.post("", json=_bundle(
        "transaction",
        _request("DELETE", f"Patient?identifier={system}|1"),
        _request("DELETE", f"Patient?identifier={system}|nothing"),
        _request("POST", "Patient", {"resourceType": "Patient", "name": [{"family": marker}]}),
    ), headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert len(entries) == 3
    assert entries[0]["response"] == {"status": "204 No Content"}
    assert entries[1]["response"] == {"status": "204 No Content"}  # no match: a no-op
    assert entries[2]["response"]["status"].startswith("201")
    for id_ in doomed:
        assert fhir.get(f"Patient/{id_}").status_code == 410
        history = fhir.get(f"Patient/{id_}/_history").json()["entry"]
        assert [e["request"]["method"] for e in history] == ["DELETE", "POST"]
    assert fhir.get(f"Patient/{bystander}").status_code == 200
    assert _count(fhir, system, "1") == 0


def test_transaction_conditional_delete_is_atomic(fhir):
    """A failing entry leaves every match of a conditional delete in place."""
    system = f"urn:txcd:{uuid.uuid4().hex}"
    kept = _ids(fhir, system, 2)
    response = fhir.post("", json=_bundle(
        "transaction",
        _request("DELETE", f"Patient?identifier={system}|1"),
        _request("GET", f"Patient/{uuid.uuid4().hex}"),  # 404: fails the transaction
    ), headers=FHIR_JSON)
    assert_outcome(response, 404)
    for id_ in kept:
        assert fhir.get(f"Patient/{id_}").status_code == 200


def test_transaction_conditional_delete_overlap_counts_every_match(fhir, db):
    """http.html#trules: every resource a conditional delete matches is one of its targets."""
    system = f"urn:txcd:{uuid.uuid4().hex}"
    first, second = _ids(fhir, system, 2)
    before = db.fhir_history.count_documents({})
    for other in (
        _request("DELETE", f"Patient/{second}"),
        _request("PUT", f"Patient/{first}", {**_patient(system, "1"), "id": first, "active": True}),
        _request("PATCH", f"Patient/{second}", {"resourceType": "Parameters", "parameter": []}),
    ):
        for entries in ((_request("DELETE", f"Patient?identifier={system}|1"), other),
                        (other, _request("DELETE", f"Patient?identifier={system}|1"))):
            body = assert_outcome(fhir.post("", json=_bundle("transaction", *entries), headers=FHIR_JSON), 400, "invalid")
            assert body["issue"][0]["expression"] == ["Bundle.entry[1].request.url"], body
            assert "only once" in body["issue"][0]["diagnostics"]
    assert db.fhir_history.count_documents({}) == before
    # two conditional deletes whose matches overlap
    entries = (_request("DELETE", f"Patient?identifier={system}|1"), _request("DELETE", f"Patient?_id={second}"))
    assert_outcome(fhir.post("", json=_bundle("transaction", *entries), headers=FHIR_JSON), 400, "invalid")
    assert fhir.get(f"Patient/{first}").status_code == fhir.get(f"Patient/{second}").status_code == 200


def test_transaction_conditional_delete_is_bounded_as_alone(fhir, db):
    """Past MAX_CONDITIONAL_DELETE matches, the transaction fails with the standalone route's
    412 too-costly, and nothing is deleted."""
    from server.fhir.search.conditional import MAX_CONDITIONAL_DELETE

    system = f"urn:txcd:{uuid.uuid4().hex}"
    many = _bundle("transaction", *(_request("POST", "Patient", _patient(system, "1")) for _ in range(MAX_CONDITIONAL_DELETE + 1)))
    assert fhir.post("", json=many, headers=FHIR_JSON).status_code == 200
    alone = assert_outcome(fhir.delete(f"Patient?identifier={system}|1"), 412, "too-costly")
    before = db.fhir_history.count_documents({})
    response = fhir.post("", json=_bundle("transaction", _request("DELETE", f"Patient?identifier={system}|1")), headers=FHIR_JSON)
    body = assert_outcome(response, 412, "too-costly")
    assert body["issue"][0]["diagnostics"] == f"Bundle.entry[0]: {alone['issue'][0]['diagnostics']}"
    assert db.fhir_history.count_documents({}) == before
    assert _count(fhir, system, "1") == MAX_CONDITIONAL_DELETE + 1


def test_batch_conditional_delete_deletes_every_match(fhir):
    """A batch entry goes through the standalone route: every match, one 204."""
    system = f"urn:bcd:{uuid.uuid4().hex}"
    doomed = _ids(fhir, system, 3)
    response = fhir.post("", json=_bundle("batch", _request("DELETE", f"Patient?identifier={system}|1")), headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    [item] = response.json()["entry"]
    assert item["response"]["status"] == "204 No Content"
    for id_ in doomed:
        assert fhir.get(f"Patient/{id_}").status_code == 410
