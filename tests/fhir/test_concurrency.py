"""Concurrent writers: optimistic locking with If-Match, and no lost or gapped versions."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from tests.fhir.helpers import FHIR_JSON, created, patient


async def _concurrent_updates(base: str, path: str, bodies: list[dict], headers: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base + "/", timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(
            *(client.put(path, content=orjson.dumps(b), headers={**FHIR_JSON, **headers}) for b in bodies)
        )


def test_twenty_updates_with_the_same_if_match_one_wins(fhir, server):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    bodies = [{**body, "birthDate": f"19{n + 10}-01-01"} for n in range(20)]
    responses = asyncio.run(_concurrent_updates(server.fhir, path, bodies, {"If-Match": 'W/"1"'}))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [412] * 19
    history = fhir.get(f"{path}/_history").json()
    assert history["total"] == 2


def test_twenty_updates_without_if_match_make_versions_2_to_21(fhir, server):
    body = created(fhir, "Patient", patient())
    path = f"Patient/{body['id']}"
    bodies = [{**body, "birthDate": f"19{n + 10}-01-01"} for n in range(20)]
    responses = asyncio.run(_concurrent_updates(server.fhir, path, bodies, {}))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert sorted(int(r.json()["meta"]["versionId"]) for r in responses) == list(range(2, 22))
    # Every write is in history, each under its own version, none lost.
    history = fhir.get(f"{path}/_history", params={"_count": "100"}).json()
    dates = {e["resource"]["birthDate"] for e in history["entry"] if e["response"]["etag"] != 'W/"1"'}
    assert dates == {b["birthDate"] for b in bodies}
    assert sorted(int(e["response"]["etag"][3:-1]) for e in history["entry"]) == list(range(1, 22))
    assert fhir.get(path).json()["meta"]["versionId"] == "21"
