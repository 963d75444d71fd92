"""Small helpers shared by the FHIR tests."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def patient(family: str | None = None, **extra: Any) -> dict[str, Any]:
    """A valid Patient with a unique family name (tests share one server)."""
    return {"resourceType": "Patient", "name": [{"family": family or f"Test-{uuid.uuid4().hex[:8]}"}], **extra}


def post(client: httpx.Client, type_: str, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(type_, content=orjson.dumps(resource), headers={**FHIR_JSON, **headers})


def put(client: httpx.Client, path: str, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.put(path, content=orjson.dumps(resource), headers={**FHIR_JSON, **headers})


def created(client: httpx.Client, type_: str, resource: dict[str, Any]) -> dict[str, Any]:
    response = post(client, type_, resource)
    assert response.status_code == 201, response.text
    return response.json()


def assert_outcome(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an OperationOutcome error with this status (and issue code)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"], body
    if code is not None:
        assert code in {i["code"] for i in body["issue"]}, body
    return body
