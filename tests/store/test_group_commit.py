"""Creates share transactions under load (group commit), each still durable before it
returns, and one create's failure stays its own. Real mongod, the store's own API."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from typing import Any

from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.client_session import AsyncClientSession

from server.store.database import Store
from server.store.fhir import FhirStore, NewVersion


class Commits(monitoring.CommandListener):
    """Counts commitTransaction commands, to see how many transactions ran."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "commitTransaction":
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _patient(family: str) -> NewVersion:
    body = b'{"resourceType":"Patient","id":"x","name":[{"family":"%s"}]}' % family.encode()
    return NewVersion("Patient", str(uuid.uuid4()), 1, datetime.now(UTC), "POST", body)


def test_concurrent_creates_share_transactions_and_a_failure_is_isolated(mongod):
    commits = Commits()
    database = f"kuroshio_group_{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, event_listeners=[commits])
        store = Store(client, database)
        await store.ensure_collections()
        fhir = FhirStore(store)
        failing = _patient("Refused")

        async def after_write(session: AsyncClientSession, new: NewVersion) -> None:
            if new.id == failing.id:
                raise ValueError("refused by the hook")

        try:
            first = [_patient(f"P{n}") for n in range(40)]
            results = await asyncio.gather(
                *(fhir.create(new, after_write) for new in [*first[:20], failing, *first[20:]]),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1 and "refused by the hook" in str(errors[0])
            # every other create is durable and complete (current and history); the failed one left nothing
            keys = [f"Patient/{new.id}" for new in first]
            assert await fhir.resources.count_documents({"_id": {"$in": keys}}) == 40
            assert await fhir.history.count_documents({"i": {"$in": [new.id for new in first]}}) == 40
            assert await fhir.resources.count_documents({"_id": f"Patient/{failing.id}"}) == 0
            assert await fhir.history.count_documents({"i": failing.id}) == 0
            # 41 creates at once, but far fewer transactions than creates
            commits.count = 0
            await asyncio.gather(*(fhir.create(_patient(f"Q{n}"), after_write) for n in range(40)))
            assert 1 <= commits.count <= 10, commits.count
            # a lone create is committed on its own
            commits.count = 0
            lone = _patient("Lone")
            await fhir.create(lone, after_write)
            assert commits.count == 1
            assert (await fhir.current("Patient", lone.id)) is not None
        finally:
            await store.client.drop_database(database)
            await store.close()

    asyncio.run(scenario())
