"""The DICOM index in MongoDB: studies, series and instances.

Three collections, one document per study / series / instance, each keyed by its UID and
carrying the Study Instance UID (`st`), the shard key DESIGN.md names:

- `dicom_instances`: `k` (normalized matching values for QIDO / C-FIND), `j` (the
  instance-level return attributes as DICOM JSON), `meta` (the whole DICOM JSON without
  bulk data, as the bytes WADO-RS metadata returns), `blob` (the blob key), `frames`
  (where each frame's bytes lie) and `bulk` (where each bulk data value lies).
- `dicom_metadata`: the `meta` of an instance too large to sit in its document (a
  TILED_SPARSE slide level has a Per-Frame Functional Groups item per tile: ~230 bytes
  each, so 16 MB, MongoDB's document limit, at about 70,000 tiles), in chunks; the
  instance then records their number in `mc`, and `find` puts them back together.
- `dicom_series` / `dicom_studies`: `k` and `j` of the level, the counts of related
  instances and series, and the study's modalities; `rev` counts changes to a study and
  `fhir` marks it as not yet reflected as a FHIR ImagingStudy.

An ingest batch and a delete each run in one transaction, so counts, modalities and the
instance documents always agree, and the unique `_id` makes a second copy of one SOP
Instance UID impossible even between concurrent writers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from bson import Binary
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, DuplicateKeyError

from server.store.database import Store, collection, find_first

STUDIES = collection(
    "dicom_studies",
    IndexModel([("k.StudyDate", DESCENDING)], name="study_date"),
    IndexModel([("k.PatientID", ASCENDING)], name="patient_id"),
    IndexModel([("k.PatientName", ASCENDING)], name="patient_name"),
    IndexModel([("k.AccessionNumber", ASCENDING)], name="accession"),
    IndexModel([("fhir", ASCENDING)], name="fhir_pending", partialFilterExpression={"fhir": True}),
)
SERIES = collection(
    "dicom_series",
    IndexModel([("st", ASCENDING), ("k.SeriesNumber", ASCENDING)], name="study_series"),
    IndexModel([("k.Modality", ASCENDING)], name="modality"),
)
INSTANCES = collection(
    "dicom_instances",
    IndexModel(
        [("st", ASCENDING), ("se", ASCENDING), ("k.InstanceNumber", ASCENDING)], name="study_series_number"
    ),
    IndexModel([("k.SOPClassUID", ASCENDING)], name="sop_class"),
)

METADATA = collection("dicom_metadata", IndexModel([("sop", ASCENDING), ("n", ASCENDING)], name="sop_chunk"))
META_INLINE = 8 * 1024 * 1024  # larger DICOM JSON goes to dicom_metadata, in chunks of this size

Document = dict[str, Any]
LEVEL_COLLECTIONS = {"study": STUDIES, "series": SERIES, "instance": INSTANCES}


@dataclass(slots=True)
class InstanceRecord:
    """Everything the index stores about one new instance."""

    study: str
    series: str
    sop: str
    blob: str
    size: int
    transfer_syntax: str
    metadata: bytes
    keys: dict[str, Document]  # level -> matching values
    attributes: dict[str, Document]  # level -> return attributes (DICOM JSON)
    modality: str | None
    frames: Document | None
    bulk: list[list[Any]]
    deflated: bool = False
    wsi: Document | None = None  # whole slide images: the slide description (dicom/wsi.py)

    def document(self, moment: datetime) -> Document:
        chunked = len(self.metadata) > META_INLINE
        return {
            "_id": self.sop,
            "st": self.study,
            "se": self.series,
            "k": self.keys["instance"],
            "j": self.attributes["instance"],
            **({"mc": -(-len(self.metadata) // META_INLINE)} if chunked else {"meta": Binary(self.metadata)}),
            "blob": self.blob,
            "size": self.size,
            "ts": self.transfer_syntax,
            "frames": self.frames,
            "bulk": self.bulk,
            "deflated": self.deflated,
            "at": moment,
        } | ({"wsi": self.wsi} if self.wsi is not None else {})

    def metadata_chunks(self) -> list[Document]:
        """The documents of `dicom_metadata` for metadata over META_INLINE (else none)."""
        if len(self.metadata) <= META_INLINE:
            return []
        return [
            {"_id": f"{self.sop}:{n}", "sop": self.sop, "st": self.study, "n": n,
             "data": Binary(self.metadata[start:start + META_INLINE])}
            for n, start in enumerate(range(0, len(self.metadata), META_INLINE))
        ]


@dataclass(slots=True)
class IndexOutcome:
    """Which records were inserted; the others name the blob already indexed (or why not)."""

    inserted: set[str] = field(default_factory=set)
    existing_blob: dict[str, str] = field(default_factory=dict)
    series_conflict: dict[str, str] = field(default_factory=dict)  # sop -> study owning series


@dataclass(slots=True)
class Removed:
    blobs: list[str]
    studies: set[str]


def _includes(projection: Document | None, name: str) -> bool:
    """Whether a find projection returns the field `name`."""
    if projection is None:
        return True
    if name in projection:
        return bool(projection[name])
    return not any(value == 1 for key, value in projection.items() if key != "_id")


class DicomIndex:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.studies = store[STUDIES]
        self.series = store[SERIES]
        self.instances = store[INSTANCES]
        self.metadata = store[METADATA]

    # --- writes -----------------------------------------------------------------------

    async def add(
        self, records: list[InstanceRecord], moment: datetime, blobs_durable: Awaitable[object]
    ) -> IndexOutcome:
        """Index new instances in one transaction (already indexed ones are left as they are).

        The transaction commits only after `blobs_durable` completes (and is aborted if it
        raises): its writes overlap the fsyncs of the bytes they name. The common case (all
        new, series known to their study or new) is tried first without reading; a
        duplicate key aborts it and the checked form runs instead.
        """

        async def attempt(session: AsyncClientSession, checked: bool) -> IndexOutcome:
            outcome = await self._add_in(session, records, moment, checked)
            await blobs_durable
            return outcome

        try:
            return await self.store.transaction(partial(attempt, checked=False))
        except (DuplicateKeyError, BulkWriteError):
            return await self.store.transaction(partial(attempt, checked=True))

    async def _add_in(
        self, session: AsyncClientSession, records: list[InstanceRecord], moment: datetime, checked: bool
    ) -> IndexOutcome:
        outcome = IndexOutcome()
        unique = list({r.sop: r for r in records}.values())
        owners: dict[str, str] = {}
        if checked:
            sops = [r.sop for r in unique]
            async for doc in self.instances.find({"_id": {"$in": sops}}, {"blob": 1}, session=session):
                outcome.existing_blob[doc["_id"]] = doc["blob"]
            series_ids = list({r.series for r in unique})
            owners = {
                doc["_id"]: doc["st"]
                async for doc in self.series.find({"_id": {"$in": series_ids}}, {"st": 1}, session=session)
            }
        new: list[InstanceRecord] = []
        for record in unique:
            if record.sop in outcome.existing_blob:
                continue
            owner = owners.setdefault(record.series, record.study)
            if owner != record.study:
                outcome.series_conflict[record.sop] = owner
                continue
            new.append(record)
        if not new:
            return outcome
        await self.instances.insert_many([r.document(moment) for r in new], session=session)
        chunks = [chunk for r in new for chunk in r.metadata_chunks()]
        if chunks:
            await self.metadata.insert_many(chunks, session=session)
        outcome.inserted = {r.sop for r in new}
        by_series: dict[str, list[InstanceRecord]] = defaultdict(list)
        for record in new:
            by_series[record.series].append(record)
        new_series: Counter[str] = Counter()
        for series_uid, members in by_series.items():
            first = members[0]
            result = await self.series.update_one(
                {"_id": series_uid, "st": first.study},  # another study's series: duplicate key
                {
                    "$setOnInsert": {"k": first.keys["series"], "j": first.attributes["series"]},
                    "$inc": {"n": len(members)},
                },
                upsert=True,
                session=session,
            )
            if result.upserted_id is not None:
                new_series[first.study] += 1
        by_study: dict[str, list[InstanceRecord]] = defaultdict(list)
        for record in new:
            by_study[record.study].append(record)
        for study_uid, members in by_study.items():
            first = members[0]
            modalities = sorted({m.modality for m in members if m.modality})
            await self.studies.update_one(
                {"_id": study_uid},
                {
                    "$setOnInsert": {
                        "j": first.attributes["study"],
                        **{f"k.{name}": value for name, value in first.keys["study"].items()},
                    },
                    "$inc": {"n": len(members), "nser": new_series[study_uid], "rev": 1},
                    "$addToSet": {"k.ModalitiesInStudy": {"$each": modalities}},
                    "$set": {"fhir": True, "at": moment},
                    "$min": {"since": moment},
                    "$unset": {"deleted": ""},
                },
                upsert=True,
                session=session,
            )
        return outcome

    async def remove(self, query: Document) -> Removed:
        """Delete the instances matching `query` (built by the service from UIDs) and
        update or delete their series and studies, in one transaction."""

        async def body(session: AsyncClientSession) -> Removed:
            moment = datetime.now(UTC)
            docs = [d async for d in self.instances.find(query, {"blob": 1, "st": 1, "se": 1}, session=session)]
            if not docs:
                return Removed([], set())
            await self.instances.delete_many({"_id": {"$in": [d["_id"] for d in docs]}}, session=session)
            await self.metadata.delete_many({"sop": {"$in": [d["_id"] for d in docs]}}, session=session)
            per_series = Counter(d["se"] for d in docs)
            per_study = Counter(d["st"] for d in docs)
            gone_series: Counter[str] = Counter()
            for series_uid, count in per_series.items():
                doc = await self.series.find_one_and_update(
                    {"_id": series_uid}, {"$inc": {"n": -count}}, return_document=True, session=session
                )
                if doc is not None and doc["n"] <= 0:
                    await self.series.delete_one({"_id": series_uid}, session=session)
                    gone_series[doc["st"]] += 1
            for study_uid, count in per_study.items():
                doc = await self.studies.find_one_and_update(
                    {"_id": study_uid},
                    {"$inc": {"n": -count, "nser": -gone_series[study_uid], "rev": 1},
                     "$set": {"fhir": True, "at": moment}, "$min": {"since": moment}},
                    return_document=True,
                    session=session,
                )
                if doc is None:
                    continue
                if doc["n"] <= 0:
                    await self.studies.update_one(
                        {"_id": study_uid},
                        {"$set": {"n": 0, "nser": 0, "k.ModalitiesInStudy": [], "deleted": True}},
                        session=session,
                    )
                else:
                    modalities = await self.series.distinct("k.Modality", {"st": study_uid}, session=session)
                    await self.studies.update_one(
                        {"_id": study_uid}, {"$set": {"k.ModalitiesInStudy": sorted(modalities)}}, session=session
                    )
            return Removed([d["blob"] for d in docs], set(per_study))

        return await self.store.transaction(body)

    # --- FHIR reflection bookkeeping ----------------------------------------------------

    async def studies_to_reflect(self, quiet_since: datetime, pending_since: datetime, limit: int = 200) -> list[Document]:
        """Studies to reflect as FHIR: changed, and unchanged since `quiet_since` or
        waiting since `pending_since` (a study that keeps receiving instances)."""
        query = {"fhir": True, "$or": [{"at": {"$lte": quiet_since}}, {"at": {"$exists": False}}, {"since": {"$lte": pending_since}}]}
        return await self.studies.find(query, {"rev": 1}, limit=limit).to_list()

    async def reflected(self, study: str, rev: int, moment: datetime) -> None:
        """Clear the pending mark unless the study changed since `rev` was read (then it
        waits again, from `moment`); a study whose last instance was deleted is dropped."""
        result = await self.studies.update_one({"_id": study, "rev": rev}, {"$set": {"fhir": False}, "$unset": {"since": ""}})
        if result.matched_count == 0:
            await self.studies.update_one({"_id": study}, {"$set": {"since": moment}})
        await self.studies.delete_one({"_id": study, "rev": rev, "deleted": True})

    # --- reads --------------------------------------------------------------------------

    async def find(
        self,
        level: str,
        query: Document,
        projection: Document | None = None,
        skip: int = 0,
        limit: int = 0,
        sort: list[tuple[str, int]] | None = None,
    ) -> list[Document]:
        if level == "study":
            query = {**query, "deleted": {"$ne": True}}
        wants_meta = level == "instance" and _includes(projection, "meta")
        if wants_meta and projection is not None and projection.get("meta") == 1:
            projection = {**projection, "mc": 1}
        cursor = self.store[LEVEL_COLLECTIONS[level]].find(
            query, projection, skip=skip, limit=limit, sort=sort or [("_id", ASCENDING)]
        )
        docs = await cursor.to_list()
        chunked = [d for d in docs if "mc" in d] if wants_meta else []
        if chunked:
            await self._join_metadata(chunked)
        return docs

    async def _join_metadata(self, docs: list[Document]) -> None:
        """Put chunked metadata back into `meta` (only where the projection asked for it)."""
        parts: dict[str, list[bytes]] = defaultdict(list)
        cursor = self.metadata.find({"sop": {"$in": [d["_id"] for d in docs]}}, sort=[("sop", ASCENDING), ("n", ASCENDING)])
        async for chunk in cursor:
            parts[chunk["sop"]].append(bytes(chunk["data"]))
        for doc in docs:
            doc["meta"] = b"".join(parts[doc["_id"]])

    async def distinct(self, level: str, key: str, query: Document) -> list[Any]:
        if level == "study":
            query = {**query, "deleted": {"$ne": True}}
        return await self.store[LEVEL_COLLECTIONS[level]].distinct(key, query)

    async def instance(self, sop: str, projection: Document) -> Document | None:
        return await find_first(self.instances, {"_id": sop}, projection)

    async def study(self, study: str) -> Document | None:
        return await find_first(self.studies, {"_id": study, "deleted": {"$ne": True}})
