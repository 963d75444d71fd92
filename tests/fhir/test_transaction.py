"""Batch and transaction Bundles: atomicity, processing order, urn:uuid resolution."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid

import httpx
import orjson

from tests.fhir.helpers import FHIR_JSON, assert_outcome, created, patient


def bundle(kind: str, *entries: dict) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": list(entries)})


def entry(method: str, url: str, resource: dict | None = None, full_url: str | None = None, **request: str) -> dict:
    item: dict = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        item["resource"] = resource
    if full_url:
        item["fullUrl"] = full_url
    return item


def post_bundle(fhir, body: bytes, **headers: str):
    return fhir.post("", content=body, headers={**FHIR_JSON, **headers})


def test_transaction_resolves_urn_uuid_references(fhir, server):
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    encounter_url = f"urn:uuid:{uuid.uuid4()}"
    response = post_bundle(
        fhir,
        bundle(
            "transaction",
            entry("POST", "Encounter", {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": patient_url}}, encounter_url),
            entry("POST", "Patient", patient(), patient_url),
            entry("POST", "Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": patient_url}, "encounter": {"reference": encounter_url}}),
        ),
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created"] * 3
    locations = [e["response"]["location"] for e in result["entry"]]
    patient_id = locations[1].split("/")[1]
    encounter = fhir.get(locations[0].rsplit("/_history", 1)[0]).json()
    assert encounter["subject"]["reference"] == f"Patient/{patient_id}"
    observation = fhir.get(locations[2].rsplit("/_history", 1)[0]).json()
    assert observation["subject"]["reference"] == f"Patient/{patient_id}"
    assert observation["encounter"]["reference"] == locations[0].rsplit("/_history", 1)[0]
    assert result["entry"][1]["fullUrl"] == f"{server.fhir}/{locations[1].rsplit('/_history', 1)[0]}"
    assert all(e["response"]["etag"] == 'W/"1"' for e in result["entry"])


def test_transaction_processing_order_and_all_methods(fhir):
    existing = created(fhir, "Patient", patient())
    doomed = created(fhir, "Patient", patient())
    client_id = f"tx-{uuid.uuid4().hex[:10]}"
    json_patch = base64.b64encode(b'[{"op":"add","path":"/active","value":true}]').decode()
    response = post_bundle(
        fhir,
        bundle(
            "transaction",
            entry("GET", f"Patient/{existing['id']}"),
            entry("PUT", f"Patient/{client_id}", {**patient(), "id": client_id}),
            entry("PATCH", f"Patient/{existing['id']}", {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": json_patch}),
            entry("DELETE", f"Patient/{doomed['id']}"),
        ),
    )
    assert response.status_code == 200, response.text
    result = response.json()["entry"]
    # GET runs last: it sees the PATCH, though it comes first in the bundle.
    assert result[0]["response"]["status"] == "200 OK"
    assert result[0]["resource"]["active"] is True and result[0]["response"]["etag"] == 'W/"2"'
    assert result[1]["response"]["status"] == "201 Created"
    assert result[2]["response"]["status"] == "200 OK"
    assert result[3]["response"]["status"] == "204 No Content"
    assert fhir.get(f"Patient/{existing['id']}").json()["active"] is True
    assert fhir.get(f"Patient/{client_id}").status_code == 200


def test_failed_transaction_leaves_nothing_behind(fhir, db):
    marker = f"atomic-{uuid.uuid4().hex}"
    existing = created(fhir, "Patient", patient())
    before_resources = db.fhir_resources.count_documents({})
    before_history = db.fhir_history.count_documents({})
    response = post_bundle(
        fhir,
        bundle(
            "transaction",
            entry("POST", "Patient", patient(marker)),
            entry("PUT", f"Patient/{existing['id']}", {**existing, "active": True}, ifMatch='W/"7"'),
        ),
    )
    body = assert_outcome(response, 412)
    assert "Bundle.entry[1]" in body["issue"][0]["diagnostics"]
    assert db.fhir_resources.count_documents({}) == before_resources
    assert db.fhir_history.count_documents({}) == before_history
    assert fhir.get(f"Patient/{existing['id']}").json()["meta"]["versionId"] == "1"

    invalid = post_bundle(fhir, bundle("transaction", entry("POST", "Patient", patient(marker)), entry("POST", "Patient", {"resourceType": "Patient", "birthDate": "never"})))
    body = assert_outcome(invalid, 400)
    assert "Bundle.entry[1].resource.birthDate" in body["issue"][0]["expression"]
    assert db.fhir_resources.count_documents({}) == before_resources


def test_transaction_errors(fhir):
    assert_outcome(post_bundle(fhir, bundle("collection")), 400)
    assert_outcome(post_bundle(fhir, orjson.dumps(patient())), 400)
    assert_outcome(post_bundle(fhir, bundle("transaction", {"resource": patient()})), 400)
    assert_outcome(post_bundle(fhir, bundle("transaction", entry("TRACE", "Patient"))), 400)
    assert_outcome(post_bundle(fhir, bundle("transaction", entry("POST", "Patient"))), 400)
    assert_outcome(post_bundle(fhir, bundle("transaction", entry("POST", "NoSuchType", {"resourceType": "NoSuchType"}))), 404)
    same = f"Patient/dup-{uuid.uuid4().hex[:8]}"
    assert_outcome(post_bundle(fhir, bundle("transaction", entry("DELETE", same), entry("DELETE", same))), 400)
    assert_outcome(fhir.post("", content=b"{", headers=FHIR_JSON), 400)


def test_transaction_response_with_representation(fhir):
    response = post_bundle(fhir, bundle("transaction", entry("POST", "Patient", patient())), Prefer="return=representation")
    assert response.json()["entry"][0]["resource"]["resourceType"] == "Patient"
    minimal = post_bundle(fhir, bundle("transaction", entry("POST", "Patient", patient())))
    assert "resource" not in minimal.json()["entry"][0]


def test_batch_entries_succeed_or_fail_independently(fhir):
    existing = created(fhir, "Patient", patient())
    response = post_bundle(
        fhir,
        bundle(
            "batch",
            entry("POST", "Patient", patient()),
            entry("POST", "Patient", {"resourceType": "Patient", "birthDate": "bad"}),
            entry("GET", f"Patient/{existing['id']}"),
            entry("GET", "Patient/missing-in-batch"),
            entry("PUT", f"Patient/{existing['id']}", {**existing, "active": False}, ifMatch='W/"1"'),
            entry("DELETE", f"Patient/{existing['id']}", ifMatch='W/"1"'),
        ),
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in result["entry"]]
    assert statuses == ["201", "400", "200", "404", "200", "412"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert result["entry"][2]["resource"]["id"] == existing["id"]
    assert fhir.get(f"Patient/{existing['id']}").json()["meta"]["versionId"] == "2"


def refusal(fhir, kind: str, *entries: dict) -> dict:
    """The OperationOutcome refusing a bundle's last entry: a transaction's own (it fails
    as a whole), a batch's in that entry's response (the others still run)."""
    response = post_bundle(fhir, bundle(kind, *entries))
    if kind == "transaction":
        return assert_outcome(response, 400)
    assert response.status_code == 200, response.text
    last = response.json()["entry"][-1]["response"]
    assert last["status"].startswith("400"), last
    return last["outcome"]


def test_malformed_entries_are_400_naming_the_element(fhir):
    """Numbers where strings belong, and Binary data that is not base64, are the client's
    error (400 with the element's FHIRPath), never a 500."""
    existing = created(fhir, "Patient", patient())
    path = f"Patient/{existing['id']}"
    json_patch = "application/json-patch+json"
    for kind in ("transaction", "batch"):
        for name in ("ifMatch", "ifNoneMatch", "ifModifiedSince", "ifNoneExist"):
            for method, url in (("POST", "Patient"), ("PUT", path), ("GET", path)):
                body = refusal(fhir, kind, entry(method, url, existing, **{name: 1}))
                assert body["issue"][0]["expression"] == [f"Bundle.entry[0].request.{name}"], (kind, method, body)
        for request, expression in (({"method": ["POST"], "url": "Patient"}, "method"), ({"method": "POST", "url": 5}, "url")):
            body = refusal(fhir, kind, {"resource": existing, "request": request})
            assert body["issue"][0]["expression"] == [f"Bundle.entry[0].request.{expression}"]
        body = refusal(fhir, kind, {"resource": existing})
        assert body["issue"][0]["expression"] == ["Bundle.entry[0].request"]
        body = refusal(fhir, kind, entry("POST", "Patient", patient(), ["urn:uuid:x"]))
        assert body["issue"][0]["expression"] == ["Bundle.entry[0].fullUrl"]
        for content_type, data, element in ((json_patch, "###", "data"), (json_patch, 12, "data"), (json_patch, "é", "data"), (3, "W10=", "contentType")):
            binary = {"resourceType": "Binary", "contentType": content_type, "data": data}
            body = refusal(fhir, kind, entry("GET", path), entry("PATCH", path, binary))
            assert body["issue"][0]["expression"] == [f"Bundle.entry[1].resource.{element}"]
    assert fhir.get(path).json()["meta"]["versionId"] == "1"


def test_conditional_targets_may_not_overlap_other_entries(fhir, db):
    """http.html#trules: resolved identities of conditional entries count as overlaps."""
    system = f"urn:overlap:{uuid.uuid4().hex}"
    target = created(fhir, "Patient", patient(identifier=[{"system": system, "value": "1"}]))
    path, search = f"Patient/{target['id']}", f"Patient?identifier={system}|1"
    before = db.fhir_history.count_documents({})
    for entries in (
        (entry("DELETE", path), entry("PUT", search, patient(identifier=[{"system": system, "value": "1"}]))),
        (entry("PUT", path, {**target, "active": True}), entry("DELETE", search)),
        (entry("DELETE", search), entry("PATCH", search, {"resourceType": "Parameters", "parameter": []})),
        (entry("POST", "Patient", patient(), ifNoneExist=f"identifier={system}|1"), entry("DELETE", path)),
    ):
        body = assert_outcome(post_bundle(fhir, bundle("transaction", *entries)), 400, "invalid")
        assert body["issue"][0]["expression"] == ["Bundle.entry[1].request.url"], body
    assert db.fhir_history.count_documents({}) == before
    assert fhir.get(path).json()["meta"]["versionId"] == "1"


def test_duplicate_full_urls_are_refused(fhir, db):
    """bdl-7: two entries under one fullUrl would be two resources for one reference."""
    full_url = f"urn:uuid:{uuid.uuid4()}"
    before = db.fhir_history.count_documents({})
    for kind in ("transaction", "batch"):
        response = post_bundle(fhir, bundle(kind, entry("POST", "Patient", patient(), full_url), entry("POST", "Patient", patient(), full_url)))
        body = assert_outcome(response, 400, "invariant")
        assert body["issue"][0]["expression"] == ["Bundle.entry[1].fullUrl"]
    assert db.fhir_history.count_documents({}) == before


def test_response_last_modified_is_a_fhir_instant(fhir):
    """Bundle.entry.response.lastModified is an instant, not the Last-Modified HTTP date."""
    existing = created(fhir, "Patient", patient())
    instant = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
    for kind in ("batch", "transaction"):
        response = post_bundle(fhir, bundle(kind, entry("POST", "Patient", patient()), entry("GET", f"Patient/{existing['id']}")))
        assert response.status_code == 200, response.text
        stamps = [e["response"]["lastModified"] for e in response.json()["entry"]]
        assert len(stamps) == 2 and all(instant.fullmatch(s) for s in stamps), stamps
        assert stamps[1][:19] == existing["meta"]["lastUpdated"][:19]


def test_head_entries_have_no_resource(fhir):
    existing = created(fhir, "Patient", patient())
    for kind in ("batch", "transaction"):
        response = post_bundle(fhir, bundle(kind, entry("HEAD", f"Patient/{existing['id']}"), entry("GET", f"Patient/{existing['id']}")))
        assert response.status_code == 200, response.text
        head, get = response.json()["entry"]
        assert head["response"]["status"] == "200 OK" and head["response"]["etag"] == 'W/"1"' and "resource" not in head
        assert get["resource"]["id"] == existing["id"]


def test_transaction_replaces_full_urls_in_every_link(fhir):
    """http.html#trules: matching links are replaced in references, uri/url/canonical
    values and narrative <a href>/<img src>; text that merely contains one is kept."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    div = (f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{patient_url}">patient</a>'
           f"<img src='{patient_url}' alt='x'/> see {patient_url}</div>")
    observation = {
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "text": {"status": "generated", "div": div},
        "extension": [{"url": "http://example.org/source", "valueUri": patient_url}],
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": patient_url}],
        "subject": {"reference": patient_url}, "note": [{"text": f"from {patient_url}"}],
    }
    care_plan = {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                 "subject": {"reference": patient_url}, "instantiatesUri": [patient_url, "http://example.org/other"]}
    response = post_bundle(fhir, bundle("transaction", entry("POST", "Patient", patient(), patient_url),
                                        entry("POST", "Observation", observation), entry("POST", "CarePlan", care_plan)))
    assert response.status_code == 200, response.text
    locations = [e["response"]["location"].rsplit("/_history", 1)[0] for e in response.json()["entry"]]
    new = locations[0]
    stored = fhir.get(locations[1]).json()
    assert stored["subject"]["reference"] == new
    assert stored["extension"][0]["valueUri"] == new
    assert stored["identifier"][0]["value"] == new
    assert f'href="{new}"' in stored["text"]["div"] and f"src='{new}'" in stored["text"]["div"]
    assert f"see {patient_url}" in stored["text"]["div"] and stored["note"][0]["text"] == f"from {patient_url}"
    assert fhir.get(locations[2]).json()["instantiatesUri"] == [new, "http://example.org/other"]


def test_malformed_batch_entry_fails_alone(fhir):
    """http.html#transaction: batch entries are processed independently, a malformed one
    included; a transaction with the same entries fails as a whole."""
    existing = created(fhir, "Patient", patient())
    entries = (entry("POST", "Patient", patient()), {"resource": patient()}, entry("TRACE", "Patient"), entry("GET", f"Patient/{existing['id']}"))
    response = post_bundle(fhir, bundle("batch", *entries))
    assert response.status_code == 200, response.text
    result = response.json()["entry"]
    assert [e["response"]["status"][:3] for e in result] == ["201", "400", "400", "200"]
    assert result[1]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1].request"]
    assert result[2]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[2].request.method"]
    assert fhir.get(result[0]["response"]["location"]).status_code == 200
    assert result[3]["resource"]["id"] == existing["id"]
    assert_outcome(post_bundle(fhir, bundle("transaction", *entries)), 400, "required")


def family_count(fhir, family: str) -> int:
    return fhir.get("Patient", params={"family": family, "_total": "accurate"}).json()["total"]


def test_failing_get_fails_the_transaction(fhir):
    """http.html#transaction: a transaction succeeds or fails as a whole, its GETs
    included: a GET answering 4xx rolls back the writes and names its entry."""
    doomed = created(fhir, "Patient", patient())
    for failing, status in (
        (entry("GET", f"Patient/missing-{uuid.uuid4().hex[:8]}"), 404),
        (entry("GET", "Patient?birthdate=not-a-date"), 400),
        (entry("GET", f"Patient/{doomed['id']}"), 410),  # deleted by the same transaction
        (entry("GET", f"Patient/{doomed['id']}/_history/9"), 404),
    ):
        marker = f"get-fails-{uuid.uuid4().hex}"
        response = post_bundle(fhir, bundle("transaction", entry("POST", "Patient", patient(marker)), failing, entry("DELETE", f"Patient/{doomed['id']}")))
        body = assert_outcome(response, status)
        assert body["issue"][0]["expression"] == ["Bundle.entry[1].request.url"], body
        assert body["issue"][0]["diagnostics"].startswith("Bundle.entry[1]: "), body
        assert family_count(fhir, marker) == 0, failing
        assert fhir.get(f"Patient/{doomed['id']}").status_code == 200


def test_transaction_gets_see_its_writes(fhir):
    """GETs run inside the transaction after its writes: a search, read, vread and
    history find what it has just created, and their results are in the response."""
    system = f"urn:tx-get:{uuid.uuid4().hex}"
    client_id = f"tx-get-{uuid.uuid4().hex[:10]}"
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": patient_url}}
    response = post_bundle(
        fhir,
        bundle(
            "transaction",
            entry("GET", f"Patient?identifier={system}|1&_total=accurate"),
            entry("GET", f"Patient/{client_id}"),
            entry("GET", f"Patient/{client_id}/_history/1"),
            entry("GET", f"Patient/{client_id}/_history"),
            entry("POST", "Patient", patient(identifier=[{"system": system, "value": "1"}]), patient_url),
            entry("PUT", f"Patient/{client_id}", {**patient(), "id": client_id}),
            entry("POST", "Observation", observation),
            entry("GET", f"Observation?subject:Patient.identifier={system}|1"),
            entry("GET", f"Patient?identifier={system}|1&_revinclude=Observation:subject"),
        ),
    )
    assert response.status_code == 200, response.text
    search, read, vread, history, create, _, created_observation, chained, revincluded = response.json()["entry"]
    new_id = create["response"]["location"].split("/")[1]
    observation_id = created_observation["response"]["location"].split("/")[1]
    assert search["response"]["status"] == "200 OK"
    assert search["resource"]["type"] == "searchset"
    assert [e["resource"]["id"] for e in search["resource"]["entry"]] == [new_id] and search["resource"]["total"] == 1
    assert [e["resource"]["id"] for e in chained["resource"]["entry"]] == [observation_id]
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in revincluded["resource"]["entry"]] == [(new_id, "match"), (observation_id, "include")]
    assert read["resource"]["id"] == client_id and read["response"]["etag"] == 'W/"1"'
    assert vread["resource"]["id"] == client_id
    assert history["resource"]["type"] == "history" and history["resource"]["total"] == 1


def test_transaction_get_not_modified_is_not_a_failure(fhir):
    """A GET answering 304 (its ifNoneMatch matched) is a success: the writes commit."""
    existing = created(fhir, "Patient", patient())
    marker = f"not-modified-{uuid.uuid4().hex}"
    response = post_bundle(
        fhir,
        bundle("transaction", entry("POST", "Patient", patient(marker)), entry("GET", f"Patient/{existing['id']}", ifNoneMatch='W/"1"')),
    )
    assert response.status_code == 200, response.text
    create, get = response.json()["entry"]
    assert get["response"]["status"] == "304 Not Modified" and "resource" not in get
    assert fhir.get(create["response"]["location"]).json()["name"][0]["family"] == marker


async def _concurrent_bundles(base: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base + "/", timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(*(client.post("", content=b, headers=FHIR_JSON) for b in bodies))


def test_concurrent_transactions_get_what_they_wrote(fhir, server):
    """Transactions racing to update one resource are re-run by MongoDB after a conflict;
    each one's GET answers what that transaction wrote (the attempt that committed), not
    another's version committed meanwhile."""
    existing = created(fhir, "Patient", patient())
    path = f"Patient/{existing['id']}"
    families = [f"race-{n}-{uuid.uuid4().hex[:8]}" for n in range(8)]
    bodies = [bundle("transaction", entry("GET", path), entry("PUT", path, {**existing, "name": [{"family": f}]})) for f in families]
    responses = asyncio.run(_concurrent_bundles(server.fhir, bodies))
    versions = []
    for family, response in zip(families, responses, strict=True):
        assert response.status_code == 200, response.text
        get, put = response.json()["entry"]
        assert get["resource"]["name"][0]["family"] == family
        assert get["response"]["etag"] == put["response"]["etag"]
        versions.append(int(put["response"]["etag"][3:-1]))
    assert sorted(versions) == list(range(2, 10))


def test_bundle_envelope_is_validated(fhir):
    """The Bundle is validated as a resource, not only its entries' resources: an unknown
    or malformed Bundle element refuses the whole batch or transaction with a 400 naming
    it, and nothing is written."""
    marker = f"envelope-{uuid.uuid4().hex}"
    for kind in ("transaction", "batch"):
        for envelope, expression in (
            ({"bogus": 1}, "Bundle.bogus"),
            ({"timestamp": "yesterday"}, "Bundle.timestamp"),
            ({"identifier": [{"system": "urn:x", "value": "1"}]}, "Bundle.identifier"),
            ({"link": [{"relation": "self"}]}, "Bundle.link[0].url"),
        ):
            body = {"resourceType": "Bundle", "type": kind, **envelope, "entry": [entry("POST", "Patient", patient(marker))]}
            outcome = assert_outcome(post_bundle(fhir, orjson.dumps(body)), 400)
            assert [i["expression"] for i in outcome["issue"]] == [[expression]], (kind, outcome)
    assert family_count(fhir, marker) == 0


def test_bundle_entry_envelope_is_validated(fhir):
    """An entry's own elements (fullUrl, request, search, ...) are validated too: a bad one
    fails a transaction as a whole, and in a batch that entry alone. Its resource is
    validated once, as the entry's, not again as part of the Bundle (a batch's entry
    answers as the same request sent alone, naming `Patient.bogus`)."""
    marker = f"entry-envelope-{uuid.uuid4().hex}"
    good = entry("POST", "Patient", patient(marker))
    for bad, expression in (
        ({**entry("POST", "Patient", patient(marker)), "bogus": True}, "Bundle.entry[1].bogus"),
        (entry("POST", "Patient", patient(marker), bogus="x"), "Bundle.entry[1].request.bogus"),
        (entry("POST", "Patient", patient(marker), full_url="urn:uuid:not a uri"), "Bundle.entry[1].fullUrl"),
        ({**entry("POST", "Patient", patient(marker)), "search": {"mode": "sometimes"}}, "Bundle.entry[1].search.mode"),
        (entry("GET", "Patient", _count=5), "Bundle.entry[1].request._count"),
        (entry("POST", "Patient", {"resourceType": "Patient", "bogus": 1}), "Bundle.entry[1].resource.bogus"),
    ):
        in_batch = "Patient.bogus" if ".resource." in expression else expression
        outcome = assert_outcome(post_bundle(fhir, bundle("transaction", good, bad)), 400)
        assert [i["expression"] for i in outcome["issue"]] == [[expression]], outcome
        response = post_bundle(fhir, bundle("batch", good, bad))
        assert response.status_code == 200, response.text
        first, second = response.json()["entry"]
        assert first["response"]["status"] == "201 Created"
        assert second["response"]["status"].startswith("400"), second
        assert [i["expression"] for i in second["response"]["outcome"]["issue"]] == [[in_batch]], second
    assert family_count(fhir, marker) == 6


def test_transaction_search_counts_inside_the_transaction(fhir):
    """A GET entry's search past a full first page counts inside the transaction (MongoDB
    refuses the `count` command there) and counts its uncommitted matches."""
    system = f"urn:tx-count:{uuid.uuid4().hex}"
    same = patient(identifier=[{"system": system, "value": "1"}])
    response = post_bundle(
        fhir,
        bundle(
            "transaction",
            entry("POST", "Patient", same), entry("POST", "Patient", same),
            entry("GET", f"Patient?identifier={system}|1&_count=1&_total=estimate"),
            entry("GET", f"Patient?identifier={system}|1&_count=1&_total=accurate"),
        ),
    )
    assert response.status_code == 200, response.text
    for searched in response.json()["entry"][2:]:
        assert searched["resource"]["total"] == 2 and len(searched["resource"]["entry"]) == 1, searched


# --- a transient MongoDB error in a GET entry (in process: the probe route is test-only) ----


async def _probe_transaction(mongod_uri: str, data_dir, probe_url: str, bodies: list[bytes]) -> tuple[list[httpx.Response], list[bool]]:
    """Post `bodies` to an in-process app on the test mongod whose `GET /fhir/{probe_url}`
    is a test-only route. Its first call reads, with the transaction's session, a
    collection created (outside the transaction) after the transaction's snapshot: MongoDB
    itself answers SnapshotUnavailable (246), labelled TransientTransactionError. Later
    calls answer a Parameters. With `?fail=always`, every call runs an unknown command, a
    database error that no retry cures. Returns the responses and, per probe call, whether
    it had a transaction session."""
    from starlette.responses import Response
    from starlette.routing import Route

    from server.app import create_app
    from server.config import Settings
    from server.fhir.http import transaction_session

    calls: list[bool] = []

    async def probe(request) -> Response:
        session = transaction_session(request)
        calls.append(session is not None)
        db = request.app.state.store.db
        if request.query_params.get("fail") == "always":
            await db.command("kuroshioNoSuchCommand")
        if len(calls) == 1:
            name = f"transient_probe_{uuid.uuid4().hex}"
            await db[name].insert_one({})  # outside the transaction, after its snapshot
            try:
                await db[name].find_one({}, session=session)
            finally:
                await db.drop_collection(name)
        return Response(b'{"resourceType":"Parameters"}', media_type="application/fhir+json")

    settings = Settings(mongodb_uri=mongod_uri, mongodb_database="kuroshio_test_inprocess", data_dir=data_dir, validation_workers=0)
    app = create_app(settings, dimse=False)
    app.router.routes.insert(0, Route(f"/fhir/{probe_url.split('?')[0]}", probe, methods=["GET"]))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.fhir_base + "/", timeout=120) as client:
            responses = [await client.post("", content=body, headers=FHIR_JSON) for body in bodies]
    return responses, calls


def test_transient_database_error_in_a_get_entry_reruns_the_transaction(mongod, tmp_path):
    """A TransientTransactionError raised by MongoDB while a transaction's GET entry runs
    reaches the transaction (it is not answered 500 in process), so MongoDB's retry re-runs
    the whole body: the Bundle succeeds, its write is made once, and the GET ran twice."""
    family = f"Transient-{uuid.uuid4().hex[:8]}"
    body = bundle("transaction", entry("POST", "Patient", patient(family)), entry("GET", "Basic/transient-probe"))
    [response], calls = asyncio.run(_probe_transaction(mongod.uri, tmp_path, "Basic/transient-probe", [body]))
    assert response.status_code == 200, response.text
    created_, read = response.json()["entry"]
    assert created_["response"]["status"].startswith("201")
    assert read["response"]["status"] == "200 OK" and read["resource"] == {"resourceType": "Parameters"}
    assert calls == [True, True]  # the failed attempt's GET, then the committed attempt's
    from pymongo import MongoClient

    with MongoClient(mongod.uri) as client:
        patients = client["kuroshio_test_inprocess"].fhir_resources.count_documents({"_id": "/".join(created_["response"]["location"].split("/")[:2])})
    assert patients == 1


def test_other_database_errors_in_a_get_entry_are_still_500(mongod, tmp_path):
    """A database error no retry cures fails the transaction with a 500 OperationOutcome
    (nothing written); in a batch, where the GET has no session, it fails its entry alone."""
    family = f"Failing-{uuid.uuid4().hex[:8]}"
    url = "Basic/failing-probe?fail=always"
    bodies = [bundle(kind, entry("POST", "Patient", patient(family)), entry("GET", url)) for kind in ("transaction", "batch")]
    (in_transaction, in_batch), calls = asyncio.run(_probe_transaction(mongod.uri, tmp_path, url, bodies))
    assert_outcome(in_transaction, 500)
    assert in_batch.status_code == 200, in_batch.text
    created_, failed = in_batch.json()["entry"]
    assert created_["response"]["status"].startswith("201")
    assert failed["response"]["status"] == "500 Internal Server Error"
    assert calls == [True, False]  # a non-transient error: the transaction is not re-run


def test_bundles_over_the_entry_limit_are_refused_before_any_entry_runs(mongod, tmp_path):
    """KUROSHIO_BUNDLE_MAX_ENTRIES (3 here) bounds batch and transaction Bundles: at the
    limit they run, one entry more is a 413 too-costly OperationOutcome naming the limit and
    the setting, and none of its entries ran (not even a batch's independent ones)."""
    from tests.conftest import start_server, stop_server
    from tests.fhir.helpers import assert_outcome

    live = start_server(mongod.uri, tmp_path / "server", {"KUROSHIO_BUNDLE_MAX_ENTRIES": "3", "KUROSHIO_WORKERS": "1"})
    try:
        with httpx.Client(base_url=live.fhir + "/", timeout=60) as client:
            for kind in ("batch", "transaction"):
                family = f"Limit-{uuid.uuid4().hex[:8]}"
                at_limit = post_bundle(client, bundle(kind, *[entry("POST", "Patient", patient(family)) for _ in range(3)]))
                assert at_limit.status_code == 200, at_limit.text
                assert [e["response"]["status"][:3] for e in at_limit.json()["entry"]] == ["201"] * 3
                over = post_bundle(client, bundle(kind, *[entry("POST", "Patient", patient(family)) for _ in range(4)]))
                issue = assert_outcome(over, 413, "too-costly")["issue"][0]
                assert "4 entries" in issue["diagnostics"] and "at most 3" in issue["diagnostics"], issue
                assert "KUROSHIO_BUNDLE_MAX_ENTRIES" in issue["diagnostics"] and issue["expression"] == ["Bundle.entry"]
                found = client.get("Patient", params={"family:exact": family, "_summary": "count"}).json()
                assert found["total"] == 3, (kind, found)
    finally:
        stop_server(live)
