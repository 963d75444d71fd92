"""Where each frame of a stored instance lies, held per process, so that a frame request
(a slide tile) costs one `pread` and no database round trip.

The index records every frame's byte ranges at ingest (instance.py). A slide level has
tens of thousands of frames, and reading one entry of such a table from MongoDB costs
milliseconds (`$slice` walks the array) while a viewer asks for hundreds of tiles a
second. `FrameTables` therefore keeps the tables of recently used instances in memory,
single-fragment frames (the usual case) as two numpy arrays, dropping the least recently
used past a bound on the number of frames held.

Why this cache cannot serve what the index no longer says: the bytes of a stored instance
never change (blob names are content-addressed, and the same SOP Instance UID is never
re-pointed to other bytes without being deleted first), nor can its study or series. What
can change is whether it still exists, and `get` checks that the blob is still there on
every call: a deleted instance is noticed at once, dropped, and the index asked again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.dicom.wsi import Slide
from server.store.blobs import BlobKey, BlobStore
from server.store.dicom import DicomIndex

MAX_FRAMES_HELD = 4_000_000  # about 64 MB of offsets and lengths per process
_FIELDS = {"st": 1, "se": 1, "blob": 1, "ts": 1, "deflated": 1, "frames": 1, "wsi": 1}


@dataclass(slots=True)
class FrameTable:
    """One instance's frames: native (start + n * size), single fragments (offsets and
    lengths arrays) or fragment lists; `locatable` is False for deflated instances and
    fragments that could not be assigned to frames at ingest."""

    study: str
    series: str
    blob: BlobKey
    transfer_syntax: str
    count: int
    locatable: bool
    native: tuple[int, int] | None = None  # (start, size of one frame)
    offsets: np.ndarray | None = None
    lengths: np.ndarray | None = None
    fragments: list[list[int]] | None = None  # per frame: [offset, length, offset, length, ...]
    slide: Slide | None = None  # whole slide images: the description recorded at ingest

    def ranges(self, number: int) -> list[tuple[int, int]]:
        """The (offset, length) byte ranges of frame `number` (1-based, checked by caller)."""
        if self.native is not None:
            start, size = self.native
            return [(start + (number - 1) * size, size)]
        if self.offsets is not None and self.lengths is not None:
            return [(int(self.offsets[number - 1]), int(self.lengths[number - 1]))]
        assert self.fragments is not None
        item = self.fragments[number - 1]
        return [(item[i], item[i + 1]) for i in range(0, len(item), 2)]


def table_of(doc: dict[str, Any]) -> FrameTable:
    """The frame table of an index document (`count` 0 when the instance has no pixel data)."""
    frames = doc.get("frames")
    deflated = bool(doc.get("deflated"))
    table = FrameTable(
        doc["st"], doc["se"], BlobKey.parse(doc["blob"]), doc["ts"],
        count=(frames or {}).get("n", 1) if frames or deflated else 0,
        locatable=not deflated and bool(frames),
        slide=Slide.from_document(doc["wsi"]) if doc.get("wsi") else None,
    )
    if not table.locatable:
        return table
    assert frames is not None
    if "start" in frames:
        table.native = (frames["start"], frames["size"])
    elif frames.get("f") is None:
        table.locatable = False
    elif all(len(item) == 2 for item in frames["f"]):
        pairs = np.asarray(frames["f"], dtype=np.int64).reshape(-1, 2)
        table.offsets, table.lengths = pairs[:, 0].copy(), pairs[:, 1].copy()
    else:
        table.fragments = frames["f"]
    return table


class FrameTables:
    """The frame tables of recently used instances (least recently used dropped)."""

    def __init__(self, index: DicomIndex, blobs: BlobStore, max_frames: int = MAX_FRAMES_HELD) -> None:
        self.index = index
        self.blobs = blobs
        self.max_frames = max_frames
        self._held: OrderedDict[str, FrameTable] = OrderedDict()
        self._frames = 0

    async def get(self, sop: str) -> FrameTable | None:
        """The frame table of a stored instance; None if it is not stored."""
        table = self._held.get(sop)
        if table is not None:
            if self.blobs.exists(table.blob):
                self._held.move_to_end(sop)
                return table
            self.forget(sop)
        doc = await self.index.instance(sop, _FIELDS)
        table = table_of(doc) if doc is not None else None
        if table is not None:
            self._hold(sop, table)
        return table

    def forget(self, sop: str) -> None:
        table = self._held.pop(sop, None)
        if table is not None:
            self._frames -= max(table.count, 1)

    def _hold(self, sop: str, table: FrameTable) -> None:
        self.forget(sop)
        self._held[sop] = table
        self._frames += max(table.count, 1)
        while self._frames > self.max_frames and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._frames -= max(dropped.count, 1)
