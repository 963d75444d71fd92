"""History at instance, type and system level, with _since and _count paging."""

from __future__ import annotations

import time
import uuid

from tests.fhir.helpers import assert_outcome, created, patient, put


def test_instance_history_newest_first(fhir, server):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    for active in (True, False):
        assert put(fhir, path, {**body, "active": active}).status_code == 200
    fhir.delete(path)
    bundle = fhir.get(f"{path}/_history").json()
    assert bundle["type"] == "history"
    assert bundle["total"] == 4
    versions = [e["response"]["etag"] for e in bundle["entry"]]
    assert versions == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"']
    assert "resource" not in bundle["entry"][0]  # the delete
    assert bundle["entry"][0]["request"] == {"method": "DELETE", "url": path}
    assert bundle["entry"][3]["request"] == {"method": "POST", "url": "Patient"}
    assert bundle["entry"][3]["response"]["status"] == "201 Created"
    assert bundle["entry"][1]["resource"]["active"] is False
    assert bundle["entry"][1]["fullUrl"] == f"{server.fhir}/{path}"


def test_history_paging_with_next_links_to_the_end(fhir):
    family = f"Paging-{uuid.uuid4().hex[:6]}"
    body = created(fhir, "Patient", patient(family))
    path = f"Patient/{body['id']}"
    for n in range(11):
        put(fhir, path, {**body, "birthDate": f"19{n + 10}-01-01"})
    seen: list[str] = []
    url = f"{path}/_history?_count=5"
    pages = 0
    while url:
        bundle = fhir.get(url).json()
        pages += 1
        seen += [e["response"]["etag"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    assert pages == 3
    assert seen == [f'W/"{v}"' for v in range(12, 0, -1)]


def test_type_and_system_history_with_since(fhir):
    marker = time.time()
    created(fhir, "Patient", patient())
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(marker - 1)) + "Z"
    later = created(fhir, "Organization", {"resourceType": "Organization", "name": f"Org {uuid.uuid4()}"})
    type_history = fhir.get("Organization/_history", params={"_since": since, "_count": "1000"}).json()
    assert later["id"] in {e["resource"]["id"] for e in type_history["entry"] if "resource" in e}
    assert {e["resource"]["resourceType"] for e in type_history["entry"] if "resource" in e} == {"Organization"}
    system = fhir.get("_history", params={"_since": since, "_count": "1000"}).json()
    kinds = {e["resource"]["resourceType"] for e in system["entry"] if "resource" in e}
    assert {"Patient", "Organization"} <= kinds
    future = fhir.get("_history", params={"_since": "2999-01-01T00:00:00Z"}).json()
    assert future.get("entry", []) == []


def test_history_errors(fhir):
    assert_outcome(fhir.get("Patient/nobody-here/_history"), 404)
    assert_outcome(fhir.get("_history", params={"_since": "yesterday"}), 400)
    assert_outcome(fhir.get("_history", params={"_since": "2020-01-01T00:00:00"}), 400)  # no zone
    assert_outcome(fhir.get("_history", params={"_count": "-1"}), 400)
    assert_outcome(fhir.get("_history", params={"_count": "100000"}), 400, "too-costly")
    assert_outcome(fhir.get("_history", params={"_cursor": "not-a-cursor"}), 400)
    assert_outcome(fhir.get("_history", params={"_bogus": "1"}), 400)
    assert_outcome(fhir.get("Nope/_history"), 404)


def test_paging_lists_current_and_superseded_versions_once_across_equal_times(fhir):
    """A transaction stamps its entries with one time, so history pages must break ties the
    same way for the current versions (in fhir_resources) and the superseded ones (in
    fhir_history); a walk with a small page finds each version exactly once, newest first."""
    marker = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1)) + "Z"
    tag = uuid.uuid4().hex
    basic = {"resourceType": "Basic", "code": {"text": tag}}
    entries = [{"request": {"method": "POST", "url": "Basic"}, "resource": basic} for _ in range(7)]
    response = fhir.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert response.status_code == 200, response.text
    ids = [e["response"]["location"].split("/")[1] for e in response.json()["entry"]]
    updates = [{"request": {"method": "PUT", "url": f"Basic/{id_}"}, "resource": {**basic, "id": id_, "subject": {"display": "2"}}}
               for id_ in ids[:3]]
    response = fhir.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": updates})
    assert response.status_code == 200, response.text
    seen: list[tuple[str, str, str]] = []
    url: str | None = f"Basic/_history?_since={marker}&_count=2"
    while url:
        bundle = fhir.get(url).json()
        seen += [(e["response"]["lastModified"], e["fullUrl"].rsplit("/", 1)[1], e["response"]["etag"])
                 for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    ours = [(id_, etag) for _, id_, etag in seen if id_ in ids]
    assert sorted(ours) == sorted([(id_, 'W/"1"') for id_ in ids] + [(id_, 'W/"2"') for id_ in ids[:3]])
    times = [moment for moment, _, _ in seen]
    assert times == sorted(times, reverse=True)
