"""Retrieve (WADO-RS and the data behind C-GET/C-MOVE): instances, metadata, frames,
bulk data, rendered images; transfer syntax negotiation and transcoding.

Instances stream from the blob store as stored when the requested transfer syntax is the
stored one (or `*`, unless it is Implicit VR Little Endian or Explicit VR Big Endian, which
web services do not use); otherwise they are transcoded with pydicom (decoders from
pylibjpeg, encoders for RLE) before the response starts (`transcode_ahead`), or refused with
406 when no codec can produce the syntax or an instance cannot be transcoded: a failure
after the 200 would only break the stream.
pydicom re-encodes element values it decodes (US, UL, FL, AT, ...) in the byte order it
writes, but not those it keeps as bytes (OW, OF, OL, OD, OV): `little_endian` swaps those of
a Big Endian instance, and `frame` the frames read from one. Metadata is the
DICOM JSON precomputed at ingest: a study's metadata is the concatenation of its stored
documents, never a file read. A frame is a byte-range read at the offsets recorded at ingest,
or decoded, like instances, before the response starts (`decoded_frames`).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, iter_pixels, pixel_array
from pydicom.uid import UID

from server.dicom.archive import Archive
from server.dicom.dicomjson import BINARY_NUMBERS, WORD_BYTES, swapped
from server.dicom.frames import FrameTable
from server.store.blobs import BlobKey, is_uid

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # retired; accepted by STOW-RS and C-STORE
RLE = "1.2.840.10008.1.2.5"
# Syntaxes any stored instance can be transcoded to (pydicom decodes, then writes these).
# Not Implicit VR Little Endian: web services shall not use it (PS3.18 8.7.3).
TRANSCODE_TARGETS = (EXPLICIT_LE, RLE)
# Stored syntaxes a web response never carries (PS3.18 8.7.3): an instance stored in one is
# sent, and announced as available (QIDO's AvailableTransferSyntaxUID), in Explicit VR
# Little Endian, the default web syntax (8.7.3.4), even for `transfer-syntax=*`.
NOT_FOR_WEB = frozenset({IMPLICIT_LE, EXPLICIT_BE})
_PIXEL_DATA = 0x7FE00010
# Transcoding decodes a whole instance in memory: a slide level of a few hundred MB of JPEG
# tiles is gigabytes of pixels. Larger instances are sent as stored only (else 406).
TRANSCODE_MAX_BYTES = 256 * 1024 * 1024
# Transcoded instances one response keeps from `transcode_ahead` until they are sent.
TRANSCODED_HELD_BYTES = 64 * 1024 * 1024
# The `window` parameter's functions (PS3.18 8.3.5.1.3; PS3.3 C.11.2.1.2, C.11.2.1.3).
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
# Media types of compressed frames (PS3.18 Table 8.7.3-2), by transfer syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotFound(LookupError):
    pass


class NotAcceptable(ValueError):
    pass


class BadRequest(ValueError):
    pass


@dataclass(slots=True)
class Stored:
    """One stored instance as retrieval needs it."""

    study: str
    series: str
    sop: str
    blob: BlobKey
    size: int
    transfer_syntax: str
    sop_class: str


def check_uids(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not is_uid(uid):
            raise BadRequest(f"{uid!r} is not a valid UID")


def _scope(study: str, series: str | None, sop: str | None) -> dict[str, str]:
    check_uids(study, series, sop)
    query = {"st": study}
    if series is not None:
        query["se"] = series
    if sop is not None:
        query["_id"] = sop
    return query


_ORDER = [("se", 1), ("k.InstanceNumber", 1), ("_id", 1)]


async def instances(archive: Archive, study: str, series: str | None = None, sop: str | None = None) -> list[Stored]:
    found = await instances_where(archive, _scope(study, series, sop))
    if not found:
        raise NotFound(missing(study, series, sop))
    return found


async def instances_where(archive: Archive, query: dict[str, Any]) -> list[Stored]:
    """The stored instances matching an index filter (from `_scope` or `qido.resolve`)."""
    fields = {"se": 1, "st": 1, "blob": 1, "size": 1, "ts": 1, "k.SOPClassUID": 1}
    docs = await archive.index.find("instance", query, fields, sort=_ORDER)
    return [
        Stored(d["st"], d["se"], d["_id"], BlobKey.parse(d["blob"]), d["size"], d["ts"], d["k"].get("SOPClassUID", ""))
        for d in docs
    ]


def missing(study: str, series: str | None, sop: str | None) -> str:
    if sop is not None:
        return f"Instance {sop} of series {series} in study {study} is not stored"
    if series is not None:
        return f"Series {series} of study {study} is not stored"
    return f"Study {study} is not stored"


def web_syntax(stored: str) -> str:
    """The transfer syntax a web response gives an instance stored in `stored` when any is
    acceptable (`transfer-syntax=*`)."""
    return EXPLICIT_LE if stored in NOT_FOR_WEB else stored


def sent_syntax(stored: Stored, syntax: str) -> str:
    """The transfer syntax `stored` is sent in when `syntax` (from `choose_syntax`) was chosen."""
    return web_syntax(stored.transfer_syntax) if syntax == "*" else syntax


def choose_syntax(stored: list[Stored], wanted: list[str]) -> str:
    """The transfer syntax to send: the first acceptable one every instance can have
    ("*" = as stored, or see `web_syntax`); 406 when none."""
    too_large = any(s.size > TRANSCODE_MAX_BYTES for s in stored)
    for syntax in wanted:
        if syntax == "*":
            if any(s.transfer_syntax in NOT_FOR_WEB and s.size > TRANSCODE_MAX_BYTES for s in stored):
                continue  # may not be sent as stored, too large to transcode
            return syntax
        if syntax in NOT_FOR_WEB:
            continue  # not even as stored (PS3.18 8.7.3)
        if all(s.transfer_syntax == syntax for s in stored) or syntax in TRANSCODE_TARGETS and not too_large:
            return syntax
    raise NotAcceptable(
        f"Cannot provide transfer syntax {', '.join(wanted)}; stored as "
        f"{', '.join(sorted({s.transfer_syntax for s in stored}))}, and can transcode to "
        f"{', '.join(TRANSCODE_TARGETS)} instances of at most {TRANSCODE_MAX_BYTES} bytes"
    )


def transcode_ahead(archive: Archive, stored: list[Stored], syntax: str) -> dict[str, bytes]:
    """Transcode, before the response starts, every instance of `stored` not sent as stored
    in `syntax` (from `choose_syntax`): one that cannot be (no decoder takes its pixel data,
    the encoder refuses its attributes, Big Endian pixel cells without a little endian form)
    is a 406 (NotAcceptable) naming it, never a stream broken after its 200. The results are
    kept for the response, by SOP Instance UID, up to TRANSCODED_HELD_BYTES in all; the
    others are transcoded again as they are sent (twice the work, not a study in memory)."""
    held: dict[str, bytes] = {}
    room = TRANSCODED_HELD_BYTES
    for item in stored:
        sent = sent_syntax(item, syntax)
        if sent == item.transfer_syntax:
            continue
        data = archive.blobs.read(item.blob)
        try:
            result = transcode(data, sent)
        except Exception as exc:  # pydicom's decoders and encoders raise many kinds of errors
            raise NotAcceptable(f"Instance {item.sop} cannot be sent in transfer syntax {sent}: {exc}") from None
        if len(result) <= room:
            held[item.sop] = result
            room -= len(result)
    return held


@lru_cache(maxsize=256)
def _header(path: str) -> pydicom.Dataset:
    """An instance's data set without its large values, only ever read: blobs are named by
    their content, so a path's header never changes, and the frames of a Big Endian
    instance need it once, not once a frame."""
    return pydicom.dcmread(path, defer_size=1024)


def instance_bytes(archive: Archive, stored: Stored, syntax: str) -> Iterator[bytes]:
    """The PS3.10 bytes of one instance in `syntax` (from `choose_syntax`; streamed when no
    transcoding, else checked by `transcode_ahead` and transcoded again)."""
    syntax = sent_syntax(stored, syntax)
    if syntax == stored.transfer_syntax:
        yield from archive.blobs.chunks(stored.blob)
        return
    yield transcode(archive.blobs.read(stored.blob), syntax)


def transcode(data: bytes, syntax: str) -> bytes:
    ds = transcoded(io.BytesIO(data), syntax)
    out = io.BytesIO()
    # dcmwrite, not save_as (which refuses to change the byte order): `transcoded` has made
    # the values it does not re-encode little endian; it encodes in the file meta's syntax
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def transcoded(source: str | io.BytesIO, syntax: str) -> pydicom.Dataset:
    """The instance in `source` (a path or bytes) as a data set re-encoded in `syntax`
    (also what C-GET/C-MOVE send to a peer that does not take the stored syntax)."""
    ds = pydicom.dcmread(source)
    target = UID(syntax)
    if not ds.file_meta.TransferSyntaxUID.is_little_endian and target.is_little_endian:
        little_endian(ds)  # pydicom encodes and compresses little endian data sets only
    # the same instance in another encoding: pydicom would give it a new SOP Instance UID
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    if target.is_compressed:
        ds.compress(target, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = target
    return ds


def swap_unit(ds: pydicom.Dataset, vr: str) -> int:
    """The bytes per unit whose order a Big Endian Pixel Data of VR `vr` reverses in `ds`:
    a pixel cell of more than 8 bits (Bits Allocated 16, 32 or 64, read so by pydicom), else
    the OW word (PS3.5 8.1.1, 8.2: cells of 8 bits or fewer packed into 16-bit words), 1 in
    OB. NotAcceptable when the cells have no such unit."""
    bits = int(ds.get("BitsAllocated") or 0)
    if bits > 8:
        if bits not in (16, 32, 64):
            raise NotAcceptable(f"Pixel data of {bits} bits allocated cannot be converted to little endian")
        return bits // 8
    return 2 if vr == "OW" else 1


def little_endian(ds: pydicom.Dataset) -> None:
    """Make a data set read from Explicit VR Big Endian encode as Explicit VR Little Endian
    (pydicom's dcmwrite re-encodes the values it decodes, not those it keeps as bytes:
    OW, OF, OL, OD, OV, swapped here, nested data sets included). UN values of private
    elements, whose structure nobody knows, are left as they are. The data set is then
    marked as read little endian: pynetdicom sends a data set in the encoding it was read
    in (a C-STORE sub-operation of it found no Big Endian context and failed); `walk` has
    decoded every element, so none is copied as the Big Endian bytes it was read as."""
    ds.walk(_swap_element)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ds.set_original_encoding(False, True, ds.original_character_set)


def _swap_element(ds: pydicom.Dataset, elem: pydicom.DataElement) -> None:
    """Make the bytes value of `elem` (of `ds`, read Big Endian) little endian."""
    if elem.VR not in WORD_BYTES or not isinstance(elem.value, bytes | bytearray) or not elem.value:
        return
    unit = swap_unit(ds, elem.VR) if elem.tag == _PIXEL_DATA else WORD_BYTES[elem.VR]
    if unit > 1:
        elem.value = swapped(bytes(elem.value), unit)


# --- metadata -----------------------------------------------------------------------------


async def metadata(archive: Archive, base: str, study: str, series: str | None = None, sop: str | None = None) -> bytes:
    """The DICOM JSON array of the instances in scope, from the stored documents."""
    docs = await archive.index.find("instance", _scope(study, series, sop), {"meta": 1, "se": 1, "st": 1}, sort=_ORDER)
    if not docs:
        raise NotFound(missing(study, series, sop))
    parts = []
    for doc in docs:
        prefix = f'"BulkDataURI":"{base}/studies/{doc["st"]}/series/{doc["se"]}/instances/{doc["_id"]}/'.encode()
        parts.append(bytes(doc["meta"]).replace(b'"BulkDataURI":"', prefix))
    return b"[" + b",".join(parts) + b"]"


# --- frames and bulk data -----------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    data: bytes
    transfer_syntax: str | None  # None: native pixel data as stored


def parse_frame_list(text: str) -> list[int]:
    """The frame numbers of a frame list: "one or more non duplicate frame numbers", as PS3.18
    defines it for the frames resource. So a list asks for at most the instance's frames
    (one repeating a frame 5000 times sent it, decoding it, 5000 times)."""
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1 or len(item) > 9:
            raise BadRequest(f"{text!r} is not a list of frame numbers (1, 2, ...)")
        numbers.append(int(item))
    if len(set(numbers)) < len(numbers):
        raise BadRequest(f"{text[:100]!r} names a frame more than once")
    return numbers


async def _instance_doc(archive: Archive, study: str, series: str, sop: str, fields: dict[str, Any]) -> dict[str, Any]:
    check_uids(study, series, sop)
    doc = await archive.index.instance(sop, fields)
    if doc is None or doc["st"] != study or doc["se"] != series:
        raise NotFound(missing(study, series, sop))
    return doc


async def frame_source(archive: Archive, study: str, series: str, sop: str) -> FrameTable:
    """Where the instance's frames lie (frames.py holds the tables of recent instances, so
    a tile request reads no index document)."""
    check_uids(study, series, sop)
    table = await archive.frame_tables.get(sop)
    if table is None or table.study != study or table.series != series:
        raise NotFound(missing(study, series, sop))
    if table.count == 0:
        raise NotFound(f"Instance {sop} has no frames")
    return table


def check_frames(table: FrameTable, numbers: list[int]) -> None:
    """404 for frame numbers the instance does not have, or frames it cannot locate."""
    for number in numbers:
        if number > table.count:
            raise NotFound(f"Frame {number} does not exist; the instance has {table.count}")
    if not table.locatable:
        raise NotFound("The frames of this instance cannot be located (deflated or unseparable fragments)")


def needs_decoding(table: FrameTable, as_stored: bool) -> bool:
    """Whether frames of `table` asked for as stored or not (`as_stored`) are decoded."""
    return UID(table.transfer_syntax).is_encapsulated and not as_stored


def frame(archive: Archive, table: FrameTable, number: int) -> Frame:
    """One frame (checked by `check_frames`) that needs no decoding (`needs_decoding`): a
    byte-range read at the offsets recorded at ingest. Native frames are little endian
    (PS3.18 8.7.3.5.3): a Big Endian instance's are swapped."""
    syntax = UID(table.transfer_syntax)
    if syntax == EXPLICIT_BE:
        return Frame(_little_endian_frame(archive, table, number), None)
    data = b"".join(archive.blobs.read_range(table.blob, offset, length) for offset, length in table.ranges(number))
    return Frame(data, str(syntax) if syntax.is_encapsulated else None)


def decoded_frames(archive: Archive, table: FrameTable, numbers: list[int]) -> list[Frame]:
    """Frames of an encapsulated instance decoded to native little endian, all of them before
    any is sent: one that fails once the 200 is on its way would break the stream. So the
    decoded frames of one request are held in memory, at most TRANSCODE_MAX_BYTES of them;
    NotAcceptable when one cannot be decoded (no decoder takes it) or they would be more.
    The file is opened and its header parsed once for all of them (it was once a frame)."""
    frames: list[Frame] = []
    held = 0
    path = archive.blobs.path(table.blob)
    with closing(iter_pixels(path, indices=[number - 1 for number in numbers], raw=True)) as decoded:
        for number in numbers:
            try:
                pixels = next(decoded)
            except Exception as exc:  # pydicom's decoders raise many kinds of errors
                raise NotAcceptable(f"Frame {number} cannot be decoded here: {exc}") from None
            frames.append(Frame(np.ascontiguousarray(pixels).tobytes(), EXPLICIT_LE))
            held += len(frames[-1].data)
            if held > TRANSCODE_MAX_BYTES:
                raise NotAcceptable(f"The frames asked for are more than {TRANSCODE_MAX_BYTES} bytes decoded; "
                                    "ask for fewer at a time, or for them as stored")
    return frames


def frame_swap_unit(archive: Archive, table: FrameTable) -> int:
    """`swap_unit` of a Big Endian instance's Pixel Data, from its header (NotAcceptable when
    its frames have no little endian form)."""
    ds = _header(str(archive.blobs.path(table.blob)))
    return swap_unit(ds, ds.get_item(_PIXEL_DATA).VR or "OW")


def _little_endian_frame(archive: Archive, table: FrameTable, number: int) -> bytes:
    """A native frame of a Big Endian instance, little endian: its cells swapped (`swap_unit`;
    an OW word may straddle two frames, so the read is widened to whole words)."""
    assert table.native is not None  # Big Endian pixel data is native (checked by `check_frames`)
    unit = frame_swap_unit(archive, table)
    start, size = table.native
    offset = start + (number - 1) * size
    begin = offset - (offset - start) % unit
    end = offset + size + (-(offset + size - start)) % unit
    data = archive.blobs.read_range(table.blob, begin, end - begin)
    return swapped(data, unit)[offset - begin:offset - begin + size]


async def bulkdata(archive: Archive, study: str, series: str, sop: str, tag: str) -> bytes:
    """The value behind a BulkDataURI of the instance's metadata (any other tag is 404: only
    those were promised, and the rest are in the metadata), as the octet-stream it is sent
    as: its value bytes, little endian (PS3.18 8.7.3.3). A byte-range read at the offsets
    recorded at ingest, of a Big Endian instance swapped by the unit of its VR (`_value_unit`);
    a deflated instance, whose offsets mean nothing, is parsed (its values kept as read)."""
    fields = {"blob": 1, "bulk": 1, "st": 1, "se": 1, "deflated": 1, "ts": 1}
    doc = await _instance_doc(archive, study, series, sop, fields)
    key = BlobKey.parse(doc["blob"])
    ranges = [(offset, length) for name, offset, length in doc.get("bulk", []) if name == tag]
    if not ranges:
        raise NotFound(f"Instance {sop} has no bulk data {tag}")
    if doc.get("deflated"):
        return bytes(pydicom.dcmread(archive.blobs.path(key)).get_item(int(tag, 16)).value or b"")
    data = archive.blobs.read_range(key, *ranges[0])
    if doc.get("ts") == EXPLICIT_BE:
        element = _header(str(archive.blobs.path(key))).get_item(int(tag, 16))
        data = swapped(data, _value_unit(element.VR or "UN"))
    return data


def _value_unit(vr: str) -> int:
    """The bytes per unit whose order Big Endian reverses in a value of `vr` (PS3.5 7.3):
    the number's size for binary numbers, the word's for OW, OF, ...; 1 for text and bytes."""
    if vr in BINARY_NUMBERS:
        return struct.calcsize(BINARY_NUMBERS[vr])
    return WORD_BYTES.get(vr, 2 if vr == "AT" else 1)


# --- rendered -----------------------------------------------------------------------------


@dataclass(slots=True)
class Rendering:
    media_type: str = "image/jpeg"
    quality: int = 90
    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None
    # The viewport's source region sx, sy, sw, sh (None: to the image's edge); used for
    # whole slide images (wsi_rendered.py).
    region: tuple[int, int, int | None, int | None] | None = None


def rendering(params: dict[str, str], media_type: str, thumbnail: bool = False) -> Rendering:
    result = Rendering(media_type)
    try:
        if "quality" in params:
            result.quality = max(1, min(100, int(params["quality"])))
        if "viewport" in params:
            vw, vh, *source = params["viewport"].split(",")
            result.viewport = (int(vw), int(vh))
            if source:
                sx, sy, sw, sh = (int(v) if v.strip() else None for v in source)
                result.region = (sx or 0, sy or 0, sw, sh)
    except (ValueError, IndexError):
        raise BadRequest("quality must be an integer and viewport vw,vh[,sx,sy,sw,sh]") from None
    if "window" in params:
        result.window = _window_parameter(params["window"])
    if result.viewport and (not 0 < result.viewport[0] <= 8192 or not 0 < result.viewport[1] <= 8192):
        raise BadRequest("viewport sizes must be between 1 and 8192")
    if thumbnail and result.viewport is None:
        result.viewport = (128, 128)
    return result


def _window_parameter(text: str) -> tuple[float, float, str]:
    """The `window` parameter, center,width[,function] (PS3.18 8.3.5.1.3; without a function,
    linear): BadRequest unless both numbers are finite, the width is above 0 and the function
    is one of WINDOW_FUNCTIONS (NaN or infinity made a meaningless image, with numpy warnings)."""
    parts = text.split(",")
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    try:
        center, width = float(parts[0]), float(parts[1])
        valid = len(parts) <= 3 and math.isfinite(center) and math.isfinite(width) and width > 0
    except (ValueError, IndexError):
        valid = False
    if not valid or function not in WINDOW_FUNCTIONS:
        raise BadRequest(f"window must be center,width[,function]: finite numbers, a width above 0, "
                         f"a function of {', '.join(WINDOW_FUNCTIONS)}")
    return center, width, function


def render(archive: Archive, table: FrameTable, frame: int, options: Rendering) -> bytes:
    """A frame as a consumer image: modality LUT, VOI window (given or stored), 8 bits."""
    from PIL import Image

    path = archive.blobs.path(table.blob)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    count = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= frame <= count:
        raise NotFound(f"Frame {frame} does not exist; the instance has {count}")
    try:
        pixels = pixel_array(path, index=frame - 1)
    except Exception as exc:
        raise NotAcceptable(f"The pixel data cannot be decoded for rendering: {exc}") from None
    color = pixels.ndim == 3 and pixels.shape[-1] in (3, 4)
    if color:
        image8 = _to_8bit(pixels.astype(np.float64), None)
    else:
        inverted = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        values = _stored_lut(apply_modality_lut, pixels, ds)
        if options.window is not None:
            center, width, function = options.window
            windowed = _window(values, center, width, function)
            image8 = (255 - windowed if inverted else windowed).astype(np.uint8)
        else:
            if "WindowCenter" in ds and "WindowWidth" in ds:
                values = _stored_lut(apply_voi_lut, values, ds)
            image8 = _to_8bit(values, inverted)
    image = Image.fromarray(image8)
    if options.viewport is not None:
        image.thumbnail(options.viewport)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, "PNG")
    else:
        image.convert("RGB" if color else "L").save(out, "JPEG", quality=options.quality)
    return out.getvalue()


def _stored_lut(apply: Callable[[np.ndarray, pydicom.Dataset], np.ndarray], values: np.ndarray,
                ds: pydicom.Dataset) -> np.ndarray:
    """`values` through the stored Modality LUT or VOI window that `apply` (pydicom's) applies;
    one it cannot apply (a window width below 1, a VOI LUT Function it does not know, a
    Modality LUT Sequence item without its LUT Descriptor) is ignored, as a viewer does, and
    the image shown over the range of its values (`_to_8bit`) instead of refused: the pixels
    are fine, only the stored hint about showing them is not."""
    try:
        return apply(values, ds).astype(np.float64)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return values.astype(np.float64)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """A VOI window (PS3.3 C.11.2.1.2.1 linear, C.11.2.1.3 linear-exact and sigmoid) to 0..255.
    Extreme finite windows (a width of 1e-308) overflow to infinity where the curve is flat
    anyway: that is their limit, so numpy is not asked to warn about it."""
    with np.errstate(over="ignore"):
        if function == "sigmoid":
            return 255.0 / (1 + np.exp(-4 * (values - center) / width))
        if function == "linear-exact":
            low, span = center - width / 2, width
        else:
            low, span = center - 0.5 - (width - 1) / 2, max(width - 1, 1e-9)
        return np.clip((values - low) / span, 0, 1) * 255


def _to_8bit(values: np.ndarray, inverted: bool) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    if inverted:
        scaled = 255 - scaled
    return scaled.astype(np.uint8)

