"""Every error is an OperationOutcome with the right status, never a traceback."""

from __future__ import annotations

from tests.fhir.helpers import FHIR_JSON, assert_outcome

LIMIT = 64 * 1024 * 1024  # the default KUROSHIO_MAX_BODY_BYTES


def test_unknown_routes_and_methods(fhir):
    assert_outcome(fhir.get("Patient/1/2/3/4/5"), 404, "not-found")
    assert_outcome(fhir.request("TRACE", "Patient/1"), 405)
    assert_outcome(fhir.put("Patient/1/_history", content=b"{}", headers=FHIR_JSON), 405)
    assert_outcome(fhir.get("$no-such-operation"), 404, "not-supported")


def test_oversized_body_is_refused_with_413(fhir):
    assert_outcome(fhir.post("Patient", content=b" " * (LIMIT + 1), headers=FHIR_JSON), 413, "too-costly")


def test_oversized_chunked_body_is_refused_while_streaming(fhir):
    def chunks():
        block = b" " * (1024 * 1024)
        for _ in range(LIMIT // len(block) + 2):
            yield block

    assert_outcome(fhir.post("Patient", content=chunks(), headers=FHIR_JSON), 413)


def test_errors_are_not_tracebacks(fhir):
    for response in (
        fhir.post("Patient", content=b'{"resourceType":"Patient","name":{"family":"not-a-list"}}', headers=FHIR_JSON),
        fhir.post("Patient", content=b'{"resourceType":"Patient","meta":"x"}', headers=FHIR_JSON),
        fhir.post("Patient", content=b'{"resourceType":"Patient","contained":[{"resourceType":"Nope"}]}', headers=FHIR_JSON),
        fhir.post("Patient", content=b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}', headers=FHIR_JSON),
        fhir.post("Patient", content=b'{"resourceType":7}', headers=FHIR_JSON),
    ):
        body = assert_outcome(response, 400)
        assert "Traceback" not in response.text, body


def test_database_outage_is_a_503_operation_outcome(tmp_path):
    import httpx

    from server.store.mongod import EmbeddedMongod
    from tests.conftest import start_server, stop_server

    with EmbeddedMongod(tmp_path / "db", cache_size_gb=0.25) as own:
        # one worker: a second one still starting when MongoDB stops would fail its
        # start-up, and a worker that cannot start with the server stops it (by design)
        live = start_server(own.uri + "&serverSelectionTimeoutMS=1000", tmp_path / "server", {"KUROSHIO_WORKERS": "1"})
        try:
            created = httpx.post(f"{live.fhir}/Patient", content=b'{"resourceType":"Patient"}', headers=FHIR_JSON)
            assert created.status_code == 201
            own.stop()
            response = httpx.get(f"{live.fhir}/Patient/{created.json()['id']}", timeout=30)
            assert_outcome(response, 503, "transient")
            assert response.headers["Retry-After"] == "5"
        finally:
            stop_server(live)


def test_405_lists_every_method_of_the_path(fhir):
    """RFC 9110 15.5.6: Allow lists the methods the target supports, not one route's."""
    body = fhir.post("Patient", content=b'{"resourceType":"Patient"}', headers=FHIR_JSON).json()
    for method, path, allowed in (
        ("POST", f"Patient/{body['id']}", "DELETE, GET, HEAD, PATCH, PUT"),
        ("TRACE", "Patient", "DELETE, GET, HEAD, POST, PUT"),
        ("DELETE", "metadata", "GET, HEAD"),
        ("POST", "metadata", "GET, HEAD"),
        ("PUT", "metadata", "GET, HEAD"),
    ):
        response = fhir.request(method, path, content=b"{}", headers=FHIR_JSON)
        assert_outcome(response, 405, "not-supported")
        assert response.headers["Allow"] == allowed, (method, path)
    assert fhir.get(f"Patient/{body['id']}").status_code == 200
    # the reserved words after the base are not resource types
    searched = fhir.post("_search", content=b"_type=Patient&_count=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert searched.status_code == 200 and searched.json()["type"] == "searchset"


def test_a_client_that_leaves_mid_body_leaves_no_traceback(server):
    """A client that declares a longer body than it sends and closes the connection is
    logged in one line; it was logged as an unhandled error with a traceback."""
    import socket
    import time
    import uuid

    id_ = f"gone-{uuid.uuid4()}"
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            f"PUT /fhir/Patient/{id_} HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
            f"Content-Length: 1000\r\n\r\n{{\"resourceType\":".encode()
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and id_ not in server.log_path.read_text(errors="replace"):
        time.sleep(0.2)
    log = server.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if id_ in line]
    assert lines and all("unhandled error" not in line and "Exception in ASGI" not in line for line in lines), lines
    after = log[log.index(lines[0]):].splitlines()[1:3]
    assert not any(line.startswith("Traceback") for line in after), after


def test_a_lone_surrogate_anywhere_is_a_400(fhir):
    """A lone surrogate escape is valid JSON but not text: refused with the body, before
    the narrative check or a transaction's scan read it (both were 500s)."""
    narrative = b'{"resourceType":"Patient","text":{"status":"generated","div":"<div xmlns=\\"http://www.w3.org/1999/xhtml\\">\\ud800</div>"}}'
    in_transaction = (b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient",'
                      b'"name":[{"family":"\\udc00"}]},"request":{"method":"POST","url":"Patient"}}]}')
    in_key = b'{"resourceType":"Patient","\\ud800":1}'
    for path, body in (("Patient", narrative), ("Patient/$validate", narrative), ("", in_transaction), ("Patient", in_key)):
        response = fhir.post(path, content=body, headers=FHIR_JSON)
        assert_outcome(response, 400)
    pair = b'{"resourceType":"Patient","name":[{"family":"\\ud83d\\ude00"}]}'  # an emoji, escaped
    created = fhir.post("Patient", content=pair, headers=FHIR_JSON)
    assert created.status_code == 201 and created.json()["name"][0]["family"] == "\U0001F600"


def test_a_request_malformed_below_the_app_gets_an_operation_outcome(server):
    """Requests the HTTP parser refuses never reach a route; they get 400 and an
    OperationOutcome (uvicorn's own answer is plain text), and the connection closes."""
    import json
    import socket

    host, port = server.base_url.removeprefix("http://").split(":")
    for request in (b"BR\x00KEN /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /fhir/metadata HTTP/1.1\r\nHost x no colon\r\n\r\n",
                    b"GET /fhir/\x00metadata HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "HTTP/1.1 400 Bad Request", (request, answer)
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        assert headers["content-type"].startswith("application/fhir+json")
        assert int(headers["content-length"]) == len(body)
        outcome = json.loads(body)
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "structure"
