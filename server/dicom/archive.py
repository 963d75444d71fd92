"""The archive: the DICOM side's handle on the shared store (the index and the blob store),
and the one ingest path that STOW-RS and C-STORE both use.

Ingest of one instance, in this order (DESIGN.md, durability before acknowledgement):
1. the received bytes are in a staging file (`BlobStore.stage`, or `stage_file` for the
   file pynetdicom received a C-STORE into), fsynced (`seal`);
2. parsed once and validated (`instance.parse`), refused with a DICOM failure reason
   and removed without trace if broken (parsing reads the page cache, so it runs while
   step 1's fsync is under way: a C-STORE waits for the longer of the two, not both);
3. linked into the UID layout once its fsync is done (`BlobStore.place`), and the
   directories of a batch fsynced once (`BlobStore.sync`);
4. indexed (QIDO attributes, DICOM JSON without bulk data, frame and bulk data offsets)
   in one durable MongoDB transaction per batch (`DicomIndex.add`), which commits only
   once step 3 is done, so the index never names bytes that a crash could lose;
5. only then reported as stored, and the study marked for FHIR reflection.

Steps 1-2 are blocking work and run in worker threads (`prepare`). Step 4 runs on the
event loop for a batch of instances at once, and its writes go to MongoDB while step 3
waits on the disk in a thread (`_settle`): a C-STORE, which the sender waits for, pays
the longer of the two, not their sum.

Policy for a SOP Instance UID that is already stored: the same data set bytes are a
success (idempotent, nothing changes; the file meta header may differ, as it does between
a STOW-RS file and a C-STORE of the same instance); a different data set is refused with 0x0111 (Duplicate SOP
Instance, PS3.7 C.4) and the stored instance is kept: an instance is replaced only by
deleting it first. Never two copies: the index's unique key decides between concurrent
writers, and content-addressed blob names keep their bytes apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from server.dicom import qido, wsi
from server.dicom.frames import FrameTables
from server.dicom.instance import DOES_NOT_MATCH_SOP_CLASS, ParsedInstance, Refused, parse
from server.dicom.levels import INSTANCE, SERIES, STUDY
from server.store.blobs import BlobKey, BlobStore, StagedFile
from server.store.database import Store
from server.store.dicom import DicomIndex, InstanceRecord

log = logging.getLogger("kuroshio.dicom")

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
BATCH = 100
# Threads that fsync staging files while `prepare` parses them (fsync waits on the disk,
# not the CPU; as many as the default executor has threads preparing, so none waits).
_SEALING = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kuroshio-seal")


@dataclass(slots=True)
class Outcome:
    """What happened to one received instance (status 0 = stored)."""

    status: int
    message: str = ""
    sop_class: str | None = None
    sop: str | None = None
    study: str | None = None
    series: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


@dataclass(slots=True)
class Prepared:
    """An instance parsed and being sealed (`staged`, placed at commit), or refused."""

    parsed: ParsedInstance | None = None
    key: BlobKey | None = None
    record: InstanceRecord | None = None
    refusal: Refused | None = None
    staged: StagedFile | None = None
    sealing: Future[None] | None = None


class Archive:
    def __init__(self, store: Store, root: Path) -> None:
        self.index = DicomIndex(store)
        self.blobs = BlobStore(root)
        self.frame_tables = FrameTables(self.index, self.blobs)  # frame requests (frames.py)
        # Called after each change to the index (the FHIR reflection wakes up).
        self.listeners: list[Callable[[], None]] = []

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    # --- blocking part (worker threads) -------------------------------------------------

    def prepare(self, staged: StagedFile, expected_study: str | None = None) -> Prepared:
        """Parse and validate one staged instance while its fsync runs (blocking).

        A refused one is discarded once sealed; an accepted one is placed by `commit`.
        """
        sealing = _SEALING.submit(staged.seal)
        accepted = False
        try:
            parsed = parse(staged.path)
            if expected_study is not None and parsed.study != expected_study:
                raise Refused(
                    DOES_NOT_MATCH_SOP_CLASS,
                    f"The instance belongs to study {parsed.study}, not {expected_study} named in the request",
                    parsed,
                )
            key = BlobKey(parsed.study, parsed.series, parsed.sop, staged.digest(parsed.dataset_start))
            prepared = Prepared(parsed, key, record_of(parsed, key, staged.size), staged=staged, sealing=sealing)
            accepted = True
            return prepared
        except Refused as refusal:
            return Prepared(refusal.parsed, refusal=refusal)
        except OSError as exc:
            log.error("cannot store an instance: %s", exc)
            return Prepared(refusal=Refused(OUT_OF_RESOURCES, "The server could not write the instance"))
        finally:
            if not accepted:
                _discard_when_sealed(staged, sealing)

    def _settle(self, batch: list[Prepared]) -> None:
        """Make a batch's accepted instances durable in the layout (blocking): each one
        sealed, then linked into place, then the changed directories fsynced. Raises
        OSError if any of them cannot be; the staging files go either way."""
        directories: set[Path] = set()
        try:
            for p in batch:
                if p.staged is not None and p.sealing is not None and p.key is not None:
                    p.sealing.result()  # a placed blob is complete: a writer of the same bytes may index it
                    directories |= self.blobs.place(p.staged, p.key)
            self.blobs.sync(directories)
        finally:
            for p in batch:
                if p.staged is not None and p.sealing is not None:
                    _discard_when_sealed(p.staged, p.sealing)

    # --- indexing (event loop) ----------------------------------------------------------

    async def commit(self, prepared: list[Prepared]) -> list[Outcome]:
        """Index a batch of prepared instances and report each one's outcome."""
        outcomes: list[Outcome] = []
        for start in range(0, len(prepared), BATCH):
            outcomes += await self._commit_batch(prepared[start:start + BATCH])
        return outcomes

    async def _commit_batch(self, batch: list[Prepared]) -> list[Outcome]:
        records = [p.record for p in batch if p.record is not None]
        settling = asyncio.ensure_future(asyncio.to_thread(self._settle, batch))
        try:
            result = await self.index.add(records, datetime.now(UTC), settling) if records else None
            await settling
        except Exception as exc:
            # Nothing was indexed. The placed blobs stay: one may be an earlier, indexed
            # copy of the same bytes.
            await asyncio.wait([settling])
            if settling.exception() is not None:
                log.error("cannot store %d instances: %s", len(records), settling.exception())
                status, message = OUT_OF_RESOURCES, "The server could not write the instance"
            else:
                log.error("indexing %d instances failed", len(records), exc_info=exc)
                status, message = PROCESSING_FAILURE, "The instance could not be indexed"
            return [_refused(p, status, message) for p in batch]
        kept: dict[str, str] = {}
        if result is not None:
            kept.update(result.existing_blob)
            kept.update({r.sop: r.blob for r in records if r.sop in result.inserted and r.sop not in kept})
        outcomes: list[Outcome] = []
        orphans: list[Prepared] = []
        for p in batch:
            if p.refusal is not None or p.parsed is None or p.key is None:
                outcomes.append(_refused(p, PROCESSING_FAILURE, ""))
            elif result is not None and p.parsed.sop in result.series_conflict:
                orphans.append(p)
                owner = result.series_conflict[p.parsed.sop]
                outcomes.append(_refused(p, DOES_NOT_MATCH_SOP_CLASS, f"Series {p.parsed.series} belongs to study {owner}"))
            elif kept.get(p.parsed.sop) == p.key.relative:
                outcomes.append(_stored(p.parsed))
            elif p.parsed.sop in kept and await asyncio.to_thread(
                self.blobs.same_content, BlobKey.parse(kept[p.parsed.sop]), p.key, p.parsed.dataset_start
            ):
                orphans.append(p)  # stored earlier under its old digest; this copy goes
                outcomes.append(_stored(p.parsed))
            else:
                orphans.append(p)
                outcomes.append(_refused(p, DUPLICATE_SOP_INSTANCE,
                                         f"SOP Instance {p.parsed.sop} is already stored with different content"))
        if orphans:
            await asyncio.to_thread(self._forget, orphans, set(kept.values()))
        if result is not None and result.inserted:
            self.changed()
        return outcomes

    def _forget(self, placed: list[Prepared], referenced: set[str]) -> None:
        """Remove placed blobs that the index does not reference."""
        for p in placed:
            if p.key is not None and p.key.relative not in referenced:
                self.blobs.remove(p.key)

    # --- delete -------------------------------------------------------------------------

    async def delete(self, study: str, series: str | None = None, sop: str | None = None) -> int:
        """Delete a study, series or instance: the index first (atomically), then bytes."""
        query: dict[str, str] = {"st": study}
        if series is not None:
            query["se"] = series
        if sop is not None:
            query["_id"] = sop
        removed = await self.index.remove(query)
        await asyncio.to_thread(lambda: [self.blobs.remove(BlobKey.parse(b)) for b in removed.blobs])
        if removed.blobs:
            self.changed()
        return len(removed.blobs)


def record_of(parsed: ParsedInstance, key: BlobKey, size: int) -> InstanceRecord:
    attributes = parsed.attributes
    slide = wsi.describe(parsed)  # whole slide images: pyramid level, tiles, specimen
    return InstanceRecord(
        study=parsed.study,
        series=parsed.series,
        sop=parsed.sop,
        blob=key.relative,
        size=size,
        transfer_syntax=parsed.transfer_syntax,
        metadata=orjson.dumps(attributes),
        keys={
            "study": qido.normalize(STUDY, attributes),
            "series": qido.normalize(SERIES, attributes),
            "instance": qido.normalize(INSTANCE, attributes),
        },
        attributes={
            "study": parsed.level_attributes(STUDY),
            "series": parsed.level_attributes(SERIES),
            "instance": parsed.level_attributes(INSTANCE),
        },
        modality=parsed.value("Modality"),
        frames=parsed.frames.document() if parsed.frames is not None else None,
        bulk=[[b.tag, b.offset, b.length] for b in parsed.bulk],
        deflated=parsed.frames is None and "1.2.840.10008.1.2.1.99" == parsed.transfer_syntax,
        wsi=slide.document() if slide is not None else None,
    )


def _stored(parsed: ParsedInstance) -> Outcome:
    return Outcome(SUCCESS, "", parsed.sop_class, parsed.sop, parsed.study, parsed.series)


def _discard_when_sealed(staged: StagedFile, sealing: Future[None]) -> None:
    """Remove a staging file once `seal` is done with it (`discard` closes the descriptor
    that `seal` may still be fsyncing), without waiting for that here."""
    sealing.add_done_callback(lambda _: staged.discard())


def _refused(p: Prepared, status: int, message: str) -> Outcome:
    """The failure outcome of `p`: its own refusal if it has one, else `status`."""
    if p.refusal is not None:
        status, message = p.refusal.reason, str(p.refusal)
    parsed = p.parsed
    if parsed is None:
        return Outcome(status, message)
    return Outcome(status, message, parsed.sop_class, parsed.sop, parsed.study, parsed.series)
