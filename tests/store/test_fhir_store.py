"""The FHIR store's own API on a real mongod: creates share their writes under load
(group commit), each still durable before it returns, and one create's failure stays its
own; a database of the earlier layout is upgraded."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from server.store.database import Store
from server.store.fhir import INLINE_LIMIT, UPGRADES, FhirStore, HistoryScope, NewVersion, _Waiting


class Commands(monitoring.CommandListener):
    """Counts the commands sent, by name (`insert` by collection), to see how the creates
    were written."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        self.count[f"insert {event.command['insert']}" if name == "insert" else name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _patient(family: str, body_size: int = 0, **search: Any) -> NewVersion:
    body = b'{"resourceType":"Patient","id":"x","name":[{"family":"%s"}]}' % family.encode()
    body += b" " * max(0, body_size - len(body))
    return NewVersion("Patient", str(uuid.uuid4()), 1, datetime.now(UTC), "POST", body, search)


def test_concurrent_creates_share_inserts_and_a_failure_is_isolated(mongod):
    commands = Commands()
    database = f"kuroshio_group_{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, event_listeners=[commands])
        store = Store(client, database)
        await store.ensure_collections()
        fhir = FhirStore(store)
        hooked: dict[str, AsyncClientSession | None] = {}

        async def after_write(session: AsyncClientSession | None, new: NewVersion) -> None:
            hooked[new.id] = session

        try:
            # a document MongoDB cannot take (a body kept inline, search terms over 16 MB)
            failing = _patient("Refused", INLINE_LIMIT - 1024, tx="x" * (9 * 1024 * 1024))
            first = [_patient(f"P{n}") for n in range(40)]
            results = await asyncio.gather(
                *(fhir.create(new, after_write) for new in [*first[:20], failing, *first[20:]]),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 1 and isinstance(errors[0], OperationFailure) and "BSONObj size" in str(errors[0]), errors
            # every other create is durable and readable; the failed one left nothing
            keys = [f"Patient/{new.id}" for new in first]
            assert await fhir.resources.count_documents({"_id": {"$in": keys}}) == 40
            assert [(await fhir.current("Patient", new.id)).body for new in first] == [new.body for new in first]
            assert await fhir.resources.count_documents({"_id": f"Patient/{failing.id}"}) == 0
            assert failing.id not in hooked and all(hooked[new.id] is None for new in first)
            # a first version is one document: nothing goes to history
            assert await fhir.history.count_documents({"i": {"$in": [new.id for new in first]}}) == 0
            # a hook that fails is its create's outcome; the others' hooks all run
            refused = _patient("Hooked")

            async def refusing(session: AsyncClientSession | None, new: NewVersion) -> None:
                if new.id == refused.id:
                    raise ValueError("refused by the hook")
                await after_write(session, new)

            others = [_patient(f"H{n}") for n in range(20)]
            results = await asyncio.gather(*(fhir.create(new, refusing) for new in [*others[:10], refused, *others[10:]]),
                                           return_exceptions=True)
            assert [str(r) for r in results if isinstance(r, BaseException)] == ["refused by the hook"]
            assert all(new.id in hooked for new in others)
            # 40 creates at once: far fewer inserts than creates, and no transaction
            commands.count.clear()
            await asyncio.gather(*(fhir.create(_patient(f"Q{n}"), after_write) for n in range(40)))
            assert 1 <= commands.count["insert fhir_resources"] <= 10, commands.count
            assert commands.count["commitTransaction"] == 0
            # a lone create is written on its own
            commands.count.clear()
            lone = _patient("Lone")
            await fhir.create(lone, after_write)
            assert commands.count["insert fhir_resources"] == 1
            assert (await fhir.current("Patient", lone.id)) is not None
            # a body too large for its document: its chunks and its document in one transaction
            commands.count.clear()
            large = _patient("Large", INLINE_LIMIT + 1)
            await fhir.create(large, after_write)
            assert commands.count["commitTransaction"] == 1 and commands.count["insert fhir_bodies"] == 1
            assert hooked[large.id] is not None
            # with a plain create beside it, each create's hook runs once
            calls: Counter[str] = Counter()

            async def counting(session: AsyncClientSession | None, new: NewVersion) -> None:
                calls[new.id] += 1

            pair = [_patient("Small"), _patient("Big", INLINE_LIMIT + 1)]  # one group (its bytes reach the limit last)
            fhir._waiting.extend(_Waiting(new, counting, asyncio.get_running_loop().create_future()) for new in pair)
            waiting = list(fhir._waiting)
            await fhir._commit_waiting()
            assert [w.done.result() for w in waiting] == [None, None] and calls == Counter(new.id for new in pair)
            assert (await fhir.current("Patient", large.id)).body == large.body
        finally:
            await store.client.drop_database(database)
            await store.close()

    asyncio.run(scenario())


def test_a_database_of_the_earlier_layout_is_upgraded(mongod):
    """Before superseded-only history, every version was in fhir_history, the current one
    included, and current documents had no entry key (`h`) or method (`m`)."""
    database = f"kuroshio_upgrade_{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        store = Store(AsyncMongoClient(mongod.uri), database)
        await store.ensure_collections()
        fhir = FhirStore(store)
        try:
            await fhir.resources.create_index([("t", 1), ("ts", -1)], name="type_lastUpdated")
            v1, v2 = _patient("One"), _patient("Two")
            v2.id, v2.version, v2.method = v1.id, 2, "PUT"
            old_current = v2.current_document()
            del old_current["h"], old_current["m"]
            await fhir.resources.insert_one(old_current)
            for new in (v1, v2):
                await fhir.history.insert_one({"_id": f"{new.key}/{new.version}", "t": "Patient", "i": new.id, "v": new.version,
                                               "ts": new.last_updated, "m": new.method, "body": new.body})
            for _ in range(2):  # a second run (another process) changes nothing
                await fhir.upgrade()
                await store[UPGRADES].delete_many({})  # and neither does one that did not see the first end
                await fhir.upgrade()
                assert [d["_id"] async for d in fhir.history.find({"i": v1.id})] == [f"{v1.key}/1"]
                current = await fhir.resources.find_one({"_id": v1.key})
                assert (current["h"], current["m"]) == (f"{v1.key}/2", "PUT")
            entries = await fhir.history_page(HistoryScope("Patient", v1.id), None, 10)
            assert [(e.version, e.method, e.body) for e in entries] == [(2, "PUT", v2.body), (1, "POST", v1.body)]
            assert "type_lastUpdated" not in await fhir.resources.index_information()
            # once recorded, a start does not look again
            await fhir.resources.update_one({"_id": v1.key}, {"$unset": {"h": ""}})
            await fhir.upgrade()
            assert "h" not in await fhir.resources.find_one({"_id": v1.key})
        finally:
            await store.client.drop_database(database)
            await store.close()

    asyncio.run(scenario())
