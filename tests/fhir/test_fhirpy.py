"""fhirpy's async client against a live `kuroshio serve`: the interactions a real app uses."""

from __future__ import annotations

import asyncio

import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound


async def _lifecycle(base: str) -> None:
    client = AsyncFHIRClient(base)
    patient = client.resource("Patient", name=[{"family": "Fhirpy", "given": ["Ann"]}], active=False)
    await patient.save()  # create
    assert patient.id and patient["meta"]["versionId"] == "1"

    read = await client.reference("Patient", patient.id).to_resource()
    assert read["name"][0]["family"] == "Fhirpy"

    read["active"] = True
    await read.save()  # update
    assert read["meta"]["versionId"] == "2"

    patched = await client.patch("Patient", patient.id, birthDate="1980-02-03")
    assert patched["birthDate"] == "1980-02-03" and patched["active"] is True

    history = await client.execute(f"Patient/{patient.id}/_history", method="get")
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']

    await client.delete("Patient", patient.id)
    with pytest.raises(ResourceNotFound):
        await client.reference("Patient", patient.id).to_resource()
    history = await client.execute(f"Patient/{patient.id}/_history", method="get")
    assert history["total"] == 4


def test_fhirpy_create_read_update_patch_delete_history(server):
    asyncio.run(_lifecycle(server.fhir))
