"""fhirpy's search API against a live server: chained search, _include, paging to the end."""

from __future__ import annotations

import asyncio

from fhirpy import AsyncFHIRClient


def test_fhirpy_search(server, dataset):
    async def scenario() -> None:
        client = AsyncFHIRClient(server.fhir, extra_headers={"Accept": "application/fhir+json"})
        observations = client.resources("Observation").search(_tag=dataset.tag)
        chained = await observations.search(subject__Patient__name="muller").fetch_all()
        assert {o.id for o in chained} == {dataset["o1"], dataset["o2"]}
        deep = await observations.search(subject__Patient__general_practitioner__name="welby").fetch_all()
        assert {o.id for o in deep} == {dataset["o1"], dataset["o2"]}
        bundle = await observations.search(code="2345-7").include("Observation", "subject").fetch_raw()
        modes = {(e.resource.resourceType, e.search.mode) for e in bundle.entry}
        assert modes == {("Observation", "match"), ("Patient", "include")}
        everything = await observations.limit(1).sort("date").fetch_all()  # four pages of one
        assert len(everything) == 4 and len({o.id for o in everything}) == 4
        patients = await client.resources("Patient").search(_tag=dataset.tag).has("Observation", "subject", code="8867-4").fetch_all()
        assert {p.id for p in patients} == {dataset["p2"], dataset["p3"]}

    asyncio.run(scenario())
