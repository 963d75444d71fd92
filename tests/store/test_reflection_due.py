"""Which studies the ImagingStudy reflector takes: quiet ones and overdue ones, once each
(a study that keeps changing is not chased). Real mongod, the index's own API."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from server.store.database import Store
from server.store.dicom import DicomIndex


def test_quiet_and_overdue_studies_are_due_and_a_changing_one_waits_again(mongod):
    database = f"kuroshio_reflect_{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        store = await Store.open(mongod.uri, database)
        index = DicomIndex(store)
        now = datetime.now(UTC)

        def seconds(n: float) -> datetime:
            return now - timedelta(seconds=n)

        try:
            await index.studies.insert_many([
                {"_id": "quiet", "fhir": True, "rev": 1, "at": seconds(5), "since": seconds(5)},
                {"_id": "busy", "fhir": True, "rev": 1, "at": now, "since": seconds(3)},
                {"_id": "overdue", "fhir": True, "rev": 1, "at": now, "since": seconds(30)},
                {"_id": "done", "fhir": False, "rev": 1, "at": seconds(60)},
            ])
            due = await index.studies_to_reflect(seconds(1), seconds(10))
            assert sorted(d["_id"] for d in due) == ["overdue", "quiet"]

            # reflected at the revision read: no longer pending
            await index.reflected("quiet", 1, now)
            # changed while it was being reflected: still pending, its wait restarts now
            await index.studies.update_one({"_id": "overdue"}, {"$inc": {"rev": 1}})
            await index.reflected("overdue", 1, now)
            assert await index.studies_to_reflect(seconds(1), seconds(10)) == []
            assert (await index.studies.find_one({"_id": "overdue"}))["fhir"] is True
            later = now + timedelta(seconds=11)
            due = await index.studies_to_reflect(later - timedelta(seconds=1), later - timedelta(seconds=10))
            assert sorted(d["_id"] for d in due) == ["busy", "overdue"]
        finally:
            await store.client.drop_database(database)
            await store.close()

    asyncio.run(scenario())
