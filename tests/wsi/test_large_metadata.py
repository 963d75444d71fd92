"""Metadata larger than a MongoDB document (a TILED_SPARSE level with ~70,000 tiles or more
has that much DICOM JSON) is kept in chunks and read back whole, by every projection that
asks for it, and deleted with its instance. The chunk size is lowered here so that a small
slide exercises the same code."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import orjson
from pydicom.uid import generate_uid

from server.dicom.archive import record_of
from server.dicom.instance import parse
from server.store import dicom as store_dicom
from server.store.blobs import BlobKey
from server.store.database import Store
from tests.conftest import DATABASE


def test_chunked_metadata_round_trip(mongod, slide_files, monkeypatch):
    monkeypatch.setattr(store_dicom, "META_INLINE", 1000)
    sparse = max(slide_files["sparse"], key=lambda p: p.stat().st_size)
    parsed = parse(Path(sparse))
    parsed.sop = generate_uid()  # its own instance in this database
    record = record_of(parsed, BlobKey(parsed.study, parsed.series, parsed.sop, "0" * 16), sparse.stat().st_size)
    assert len(record.metadata) > 5 * 1000

    async def scenario() -> None:
        store = await Store.open(mongod.uri, DATABASE)
        try:
            index = store_dicom.DicomIndex(store)
            blobs_durable = asyncio.get_running_loop().create_future()
            blobs_durable.set_result(None)  # no blob here: the index alone is tested
            await index.add([record], datetime.now(UTC), blobs_durable)
            raw = await index.instances.find_one({"_id": parsed.sop})
            assert "meta" not in raw and raw["mc"] == -(-len(record.metadata) // 1000)
            for projection in (None, {"meta": 1, "se": 1}, {"frames": 0, "bulk": 0}):
                docs = await index.find("instance", {"_id": parsed.sop}, projection)
                assert bytes(docs[0]["meta"]) == record.metadata, projection
            assert orjson.loads(record.metadata)["52009230"]["Value"]
            docs = await index.find("instance", {"_id": parsed.sop}, {"meta": 0})
            assert "meta" not in docs[0]
            removed = await index.remove({"_id": parsed.sop})
            assert removed.blobs == [record.blob]
            assert await index.metadata.count_documents({"sop": parsed.sop}) == 0
        finally:
            await store.close()

    asyncio.run(scenario())
