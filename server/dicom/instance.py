"""Reading one received instance: parse once, validate, and derive everything the index
needs (QIDO attributes, the DICOM JSON without bulk data, bulk data and frame offsets).

pydicom reads the header (everything before Pixel Data, large values deferred, so memory
stays small whatever the instance size); this module then walks the Pixel Data element
itself to record where each frame lies in the file: for native pixel data by arithmetic,
for encapsulated pixel data from the Extended Offset Table, the Basic Offset Table, or a
single scan of the fragment items. pydicom's `parse_fragments` gives positions but not
lengths and does not notice a truncated item, so the scan here is our own (a few lines).

Refusals carry the PS3.4 / PS3.18 failure reason: 0xC000 (cannot understand: not a PS3.10
file, truncated, transfer syntax contradicted by the data), 0xC122 (transfer syntax not
supported), 0xA900 (data set does not match its SOP class: required UIDs missing or
invalid, pixel data shorter or longer than its description).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.encaps import parse_basic_offsets
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from server.dicom import dicomjson
from server.dicom.levels import INSTANCE, SERIES, STUDY, TAGS, Level
from server.store.blobs import is_uid

CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
DOES_NOT_MATCH_SOP_CLASS = 0xA900
PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_VR_BYTES = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
Json = dict[str, Any]


class Refused(Exception):
    """The instance cannot be stored; `reason` is the DICOM failure status, and `parsed`
    the instance when the refusal came after its UIDs were read and validated (a failure
    report names the instance then, PS3.18 10.5.3)."""

    def __init__(self, reason: int, message: str, parsed: ParsedInstance | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.parsed = parsed


@dataclass(slots=True)
class Frames:
    """Where each frame's bytes lie: native (arithmetic) or lists of fragment ranges."""

    count: int
    native_start: int | None = None
    native_size: int | None = None
    fragments: list[list[int]] | None = None  # per frame: [offset, length, offset, length, ...]

    def document(self) -> dict[str, Any]:
        if self.native_start is None:  # encapsulated; f is None when frames are not separable
            return {"n": self.count, "f": self.fragments}
        return {"n": self.count, "start": self.native_start, "size": self.native_size}


@dataclass(slots=True)
class ParsedInstance:
    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str
    attributes: Json
    bulk: list[dicomjson.BulkData]
    frames: Frames | None
    dataset_start: int  # where the data set begins, after the file meta group

    def level_attributes(self, level: Level) -> Json:
        return {tag: self.attributes[tag] for tag in level.tags if tag in self.attributes}

    def value(self, keyword: str) -> Any:
        element = self.attributes.get(TAGS[keyword])
        values = element.get("Value") if element else None
        return values[0] if values else None


def parse(path: Path) -> ParsedInstance:
    """Parse and validate a received PS3.10 file (raises Refused)."""
    try:
        return _parse(path)
    except Refused:
        raise
    except Exception as exc:  # pydicom raises many kinds of errors on malformed input
        raise Refused(CANNOT_UNDERSTAND, f"Cannot parse the DICOM data set: {exc}") from None


def _parse(path: Path) -> ParsedInstance:
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=dicomjson.INLINE_LIMIT)
        except InvalidDicomError as exc:
            raise Refused(CANNOT_UNDERSTAND, f"Not a DICOM PS3.10 file: {exc}") from None
        pixel_position = fp.tell()
        start = dataset_start(fp.fileno())
        transfer_syntax = _transfer_syntax(ds)
        frames = None
        deflated = UID(transfer_syntax).is_deflated
        if deflated:
            # Offsets in a deflated file mean nothing: read it whole; frames and bulk
            # data of such instances are served by parsing (see wado.py).
            fp.seek(0)
            ds = pydicom.dcmread(fp)
        else:
            _check_encoding(fp, ds, transfer_syntax)
            _check_complete(ds, size)
        encoded = dicomjson.encode(ds)
        attributes = encoded.attributes
        if pixel_position < size and not deflated:
            frames = _pixel_data(fp, ds, encoded, transfer_syntax, pixel_position, size)
            attributes.update(_pixel_json(ds, attributes, encoded.bulk))
    parsed = ParsedInstance(
        study=_text(attributes, "0020000D"),
        series=_text(attributes, "0020000E"),
        sop=_text(attributes, "00080018"),
        sop_class=_text(attributes, "00080016"),
        transfer_syntax=transfer_syntax,
        attributes=encoded.attributes,
        bulk=encoded.bulk,
        frames=frames,
        dataset_start=start,
    )
    _check_identity(ds, parsed)
    return parsed


def _text(attributes: Json, tag: str) -> str:
    values = attributes.get(tag, {}).get("Value")
    return str(values[0]) if values and values[0] is not None else ""


def _number(attributes: Json, tag: str, default: int) -> int:
    values = attributes.get(tag, {}).get("Value")
    try:
        return int(values[0]) if values and values[0] is not None else default
    except (TypeError, ValueError):
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"Attribute {tag} is not a number") from None


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = ds.file_meta
    value = str(meta.get("TransferSyntaxUID", "") or "").strip()
    if not value:
        raise Refused(CANNOT_UNDERSTAND, "The file meta information has no Transfer Syntax UID")
    uid = UID(value)
    if not uid.is_transfer_syntax:
        raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, f"Transfer syntax {value} is not supported")
    return value


def _check_encoding(fp: BinaryIO, ds: pydicom.Dataset, transfer_syntax: str) -> None:
    """Refuse a data set whose encoding contradicts its declared transfer syntax.

    pydicom silently switches to the encoding it finds; a stored file must be readable by
    any client trusting its meta header, so the first element must agree with it.
    """
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        return
    header = os.pread(fp.fileno(), 6, dataset_start(fp.fileno()))  # the first data element
    if len(header) < 6:
        return
    looks_explicit = header[4:6] in _VR_BYTES
    if looks_explicit == uid.is_implicit_VR:
        found = "explicit" if looks_explicit else "implicit"
        raise Refused(
            CANNOT_UNDERSTAND,
            f"The data set is encoded with {found} VR but its transfer syntax {transfer_syntax} says otherwise",
        )


def dataset_start(fd: int) -> int:
    """The offset after the file meta group (always explicit VR little endian)."""
    position = 132
    while True:
        head = os.pread(fd, 8, position)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            return position
        if head[4:6] in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OV", b"OL", b"OD", b"OF", b"SV", b"UV"):
            (length,) = struct.unpack("<L", os.pread(fd, 4, position + 8))
            position += 12 + length
        else:
            position += 8 + struct.unpack("<H", head[6:8])[0]


def _check_complete(ds: pydicom.Dataset, size: int) -> None:
    for raw in ds._dict.values():
        if not isinstance(raw, pydicom.dataelem.RawDataElement) or raw.length == 0xFFFFFFFF:
            continue
        if raw.value is not None and len(raw.value) != raw.length or raw.value_tell + raw.length > size:
            raise Refused(CANNOT_UNDERSTAND, f"The file is truncated inside element {raw.tag}")


def _check_identity(ds: pydicom.Dataset, parsed: ParsedInstance) -> None:
    for name, value in (
        ("StudyInstanceUID", parsed.study),
        ("SeriesInstanceUID", parsed.series),
        ("SOPInstanceUID", parsed.sop),
        ("SOPClassUID", parsed.sop_class),
    ):
        if not value:
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"The data set has no {name}")
        if not is_uid(value):
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"{name} {value!r} is not a valid UID")
    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPInstanceUID", parsed.sop)).strip("\0 ") != parsed.sop:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, "MediaStorageSOPInstanceUID differs from SOPInstanceUID", parsed)
    if str(meta.get("MediaStorageSOPClassUID", parsed.sop_class)).strip("\0 ") != parsed.sop_class:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, "MediaStorageSOPClassUID differs from SOPClassUID", parsed)


# --- pixel data ---------------------------------------------------------------------------


def _pixel_data(
    fp: BinaryIO, ds: pydicom.Dataset, encoded: dicomjson.Encoded, transfer_syntax: str, position: int, size: int
) -> Frames | None:
    attributes = encoded.attributes
    uid = UID(transfer_syntax)
    little = uid.is_little_endian
    endian = "<" if little else ">"
    implicit = uid.is_implicit_VR
    fp.seek(position)
    head = fp.read(12 if not implicit else 8)
    group, element = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        raise Refused(CANNOT_UNDERSTAND, f"Unexpected element {tag:08X} where pixel data was expected")
    if implicit:
        (length,) = struct.unpack(f"{endian}L", head[4:8])
        value_start = position + 8
    else:
        (length,) = struct.unpack(f"{endian}L", head[8:12])
        value_start = position + 12
    rows = _number(attributes, "00280010", 0)
    columns = _number(attributes, "00280011", 0)
    count = _number(attributes, "00280008", 1) or 1
    if length == 0xFFFFFFFF:
        if not uid.is_encapsulated:
            raise Refused(CANNOT_UNDERSTAND, "Encapsulated pixel data in a native transfer syntax")
        fragments, end = _scan_fragments(fp, value_start, size, endian)
        frames = Frames(count, fragments=_frames_of(fp, ds, fragments, value_start, count, endian))
    else:
        end = value_start + length
        if end > size:
            raise Refused(CANNOT_UNDERSTAND, "The file is truncated inside the pixel data")
        if uid.is_encapsulated and tag == 0x7FE00010:
            raise Refused(CANNOT_UNDERSTAND, "Native pixel data in an encapsulated transfer syntax")
        samples = _number(attributes, "00280002", 1)
        if _text(attributes, "00280004").strip() == "YBR_FULL_422":
            samples = 2  # two of every three chroma samples are not sent (PS3.3 C.7.6.3.1.2)
        bits = _number(attributes, "00280100", 0)
        frame_bits = rows * columns * samples * bits
        expected = (frame_bits * count + 7) // 8
        if tag == 0x7FE00010 and (length < expected or length > expected + 1):
            raise Refused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"Pixel data has {length} bytes; Rows, Columns, SamplesPerPixel, BitsAllocated "
                f"and NumberOfFrames describe {expected}",
            )
        byte_aligned = frame_bits % 8 == 0
        frames = Frames(count, native_start=value_start, native_size=frame_bits // 8) if byte_aligned else None
    if end < size:
        _read_trailing(fp, encoded, end, implicit, little)
    return frames


def _scan_fragments(fp: BinaryIO, start: int, size: int, endian: str) -> tuple[list[tuple[int, int]], int]:
    """Every item of the encapsulated value as (value offset, length), the offset table
    first; and the position after the sequence delimiter."""
    items: list[tuple[int, int]] = []
    position = start
    fd = fp.fileno()
    while True:
        header = os.pread(fd, 8, position)
        if len(header) < 8:
            raise Refused(CANNOT_UNDERSTAND, "The file is truncated inside the encapsulated pixel data")
        group, element, length = struct.unpack(f"{endian}HHL", header)
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            return items, position + 8
        if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
            raise Refused(CANNOT_UNDERSTAND, f"Malformed encapsulated pixel data at byte {position}")
        if position + 8 + length > size:
            raise Refused(CANNOT_UNDERSTAND, "The file is truncated inside the encapsulated pixel data")
        items.append((position + 8, length))
        position += 8 + length


def _frames_of(
    fp: BinaryIO, ds: pydicom.Dataset, items: list[tuple[int, int]], value_start: int, count: int, endian: str
) -> list[list[int]] | None:
    """Group fragments into frames; None when the grouping cannot be known."""
    if not items:
        raise Refused(CANNOT_UNDERSTAND, "Encapsulated pixel data without a Basic Offset Table item")
    fragments = items[1:]
    first_item = fragments[0][0] - 8 if fragments else 0
    by_position = {offset - 8 - first_item: index for index, (offset, _) in enumerate(fragments)}

    def grouped(starts: list[int]) -> list[list[int]] | None:
        indexes = [by_position.get(s) for s in starts]
        if None in indexes or indexes != sorted(indexes):
            return None
        bounds = [i for i in indexes if i is not None] + [len(fragments)]
        return [
            [v for offset, length in fragments[bounds[i]:bounds[i + 1]] for v in (offset, length)]
            for i in range(len(bounds) - 1)
        ]

    extended = ds.get("ExtendedOffsetTable")  # the value (bytes), read from the file
    if extended:
        offsets = struct.unpack(f"{endian}{len(extended) // 8}Q", extended)
        if len(offsets) == count:
            return grouped(list(offsets))
    fp.seek(value_start)
    basic = parse_basic_offsets(fp, endianness=endian)
    if len(basic) == count:
        return grouped(basic)
    if len(fragments) == count:
        return [[offset, length] for offset, length in fragments]
    if count == 1:
        return [[v for offset, length in fragments for v in (offset, length)]]
    starts = []
    for offset, length in fragments:
        marker = os.pread(fp.fileno(), 4, offset)
        if marker[:2] == b"\xff\xd8" or marker == b"\xff\x4f\xff\x51":
            starts.append(offset - 8 - first_item)
    return grouped(starts) if len(starts) == count else None


def _read_trailing(fp: BinaryIO, encoded: dicomjson.Encoded, end: int, implicit: bool, little: bool) -> None:
    """Elements after the pixel data (trailing padding, ...) join the metadata."""
    fp.seek(end)
    try:
        trailing = read_dataset(fp, implicit, little, defer_size=dicomjson.INLINE_LIMIT)
    except Exception as exc:
        raise Refused(CANNOT_UNDERSTAND, f"Cannot parse the elements after the pixel data: {exc}") from None
    extra = dicomjson.encode(trailing)
    encoded.attributes.update(extra.attributes)
    encoded.bulk.extend(extra.bulk)


def _pixel_json(ds: pydicom.Dataset, attributes: Json, bulk: list[dicomjson.BulkData]) -> Json:
    """The pixel data element in the metadata: a bulk data reference served from the
    frame table (its offset here is unused)."""
    uid = UID(str(ds.file_meta.TransferSyntaxUID))
    if uid.is_encapsulated:
        vr = "OB"
    else:
        vr = "OW" if _number(attributes, "00280100", 8) > 8 else "OB"
    bulk.append(dicomjson.BulkData("7FE00010", 0, 0))
    return {"7FE00010": {"vr": vr, "BulkDataURI": "bulkdata/7FE00010"}}
