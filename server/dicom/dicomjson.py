"""The DICOM JSON Model (PS3.18 Annex F) of a parsed instance, without bulk data.

Why not `Dataset.to_json_dict`: pydicom converts every raw element into a `DataElement`
with its Python value types before encoding, which costs about 8 ms for a CT header and
would cap ingest near 120 instances/s. This encoder reads the raw element bytes pydicom
has already located and produces the same JSON for the common value representations
directly; anything unusual (sequences' items aside, which recurse here too) falls back to
pydicom's own element encoder, so the output is pydicom's by construction and
tests/dicom/test_dicomjson.py checks it against pydicom on every test file.

Bulk data (binary values longer than pydicom's inline limit, and deferred values) are
replaced by a `BulkDataURI` relative to the instance (`bulkdata/<tag>`); the caller records
the byte offset and length of each so that the URI resolves to a byte-range read.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# pydicom inlines binary values up to (1024 // 4) * 3 bytes (its default threshold).
INLINE_LIMIT = 768
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW"}
# Bytes per unit whose order Big Endian reverses, of the values pydicom keeps as bytes
# (PS3.5 6.2); Pixel Data, see wado.swap_unit.
WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
TEXT_SINGLE = {"LT", "ST", "UT", "UR"}
TEXT_MULTI = {"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI"}
BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
# Character sets whose text this encoder decodes itself; others go through pydicom.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_ASCII_ONLY = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}

Json = dict[str, Any]


@dataclass(slots=True)
class BulkData:
    """A top-level element left out of the JSON: where its value lies in the file."""

    tag: str
    offset: int
    length: int


@dataclass(slots=True)
class Encoded:
    attributes: Json
    bulk: list[BulkData] = field(default_factory=list)


def encode(ds: Dataset) -> Encoded:
    """The DICOM JSON object of a dataset read by `dcmread` (raw elements untouched)."""
    out = Encoded({})
    codec = _codec(ds)
    for tag in sorted(ds._dict):
        key = f"{tag:08X}"
        value = _element(ds, tag, codec, top_level=True, key=key, bulk=out.bulk)
        out.attributes[key] = value
    return out


def _codec(ds: Dataset) -> str | None:
    raw = ds._dict.get(BaseTag(0x00080005))
    if raw is None:
        return "ascii"
    value = ds[0x00080005].value
    terms = [value] if isinstance(value, str) else list(value or [])
    codecs = {_CODECS.get((term or "").strip()) for term in terms} if terms else {"ascii"}
    if len(codecs) != 1 or None in codecs:
        return None
    return codecs.pop()


def _element(
    ds: Dataset, tag: BaseTag, codec: str | None, top_level: bool, key: str, bulk: list[BulkData]
) -> Json:
    raw = ds._dict[tag]
    deferred = isinstance(raw, RawDataElement) and raw.value is None and raw.length > 0
    if isinstance(raw, RawDataElement) and not deferred:
        vr = raw.VR or _dictionary_vr(tag)
        fast = _fast(vr, raw, codec)
        if fast is not None:
            return fast
        if vr in BULK_VRS and raw.length > INLINE_LIMIT and top_level:
            bulk.append(BulkData(key, raw.value_tell, raw.length))
            return {"vr": vr, "BulkDataURI": f"bulkdata/{key}"}
    elif deferred and (raw.VR or _dictionary_vr(tag)) != "SQ":  # a large value left in the file
        vr = raw.VR or _dictionary_vr(tag)
        if vr in ("US or SS", "OB or OW", "US or OW", "US or SS or OW"):
            vr = "OW" if "OW" in vr else "US"
        bulk.append(BulkData(key, raw.value_tell, raw.length))
        return {"vr": vr, "BulkDataURI": f"bulkdata/{key}"}
    element = ds[tag]  # reads a deferred sequence (a sequence is never bulk data, PS3.18 F.2.5)
    if element.VR == "SQ":
        return {"vr": "SQ", "Value": [_item(item, codec) for item in element.value]}
    return _pydicom(element, top_level, key, bulk, raw)


def _item(item: Dataset, codec: str | None) -> Json:
    return {
        f"{tag:08X}": _element(item, tag, codec, top_level=False, key="", bulk=[])
        for tag in sorted(item._dict)
    }


def _pydicom(
    element: DataElement, top_level: bool, key: str, bulk: list[BulkData], raw: object
) -> Json:
    if top_level and isinstance(raw, RawDataElement):
        handler: Callable[[DataElement], str] | None = lambda _e: f"bulkdata/{key}"
    else:
        handler = None
    encoded = _storable(element.to_json_dict(handler, 1024))
    unit = WORD_BYTES.get(element.VR, 1)
    if "InlineBinary" in encoded and unit > 1 and isinstance(raw, RawDataElement) and not raw.is_little_endian:
        # the web is little endian (PS3.18 F.2.7, 8.7.3): a Big Endian instance's words swapped
        value = swapped(base64.b64decode(encoded["InlineBinary"]), unit)
        encoded["InlineBinary"] = base64.b64encode(value).decode("ascii")
    if "BulkDataURI" in encoded:
        assert isinstance(raw, RawDataElement)
        bulk.append(BulkData(key, raw.value_tell, raw.length))
    return encoded


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _fast(vr: str, raw: RawDataElement, codec: str | None) -> Json | None:
    """The JSON of common raw elements, or None to let pydicom handle it."""
    value: bytes = raw.value or b""
    if not raw.is_little_endian:
        return None
    if not value:
        return {"vr": vr} if vr in TEXT_MULTI or vr in TEXT_SINGLE or vr in BINARY_NUMBERS or vr in ("PN", "DS", "IS") else None
    if vr in TEXT_MULTI or vr in ("DS", "IS", "PN") or vr in TEXT_SINGLE:
        if codec is None and vr not in _ASCII_ONLY:
            return None
        try:
            text = value.decode("ascii" if vr in _ASCII_ONLY else codec or "ascii")
        except UnicodeDecodeError:
            return None
        if vr in TEXT_SINGLE:
            stripped = text.rstrip(" \x00") if vr != "UR" else text.strip(" \x00")
            return {"vr": vr, "Value": [stripped]} if stripped else {"vr": vr}
        parts = text.rstrip(" \x00").split("\\")
        if vr == "PN":
            return _person_names(parts)
        if vr == "DS":
            return _numbers(vr, parts, float)
        if vr == "IS":
            return _numbers(vr, parts, int)
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    fmt = BINARY_NUMBERS.get(vr)
    if fmt is not None:
        size = struct.calcsize("<" + fmt)
        if len(value) % size:
            return None
        numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
        if fmt in "fd" and any(n != n or n in (float("inf"), float("-inf")) for n in numbers):
            return None
        return {"vr": vr, "Value": [float(n) for n in numbers] if fmt in "fd" else numbers}
    if vr == "AT":
        if len(value) % 4:
            return None
        pairs = struct.unpack(f"<{len(value) // 2}H", value)
        return {"vr": "AT", "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]}
    if vr in BULK_VRS and len(value) <= INLINE_LIMIT:
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    return None


def _numbers(vr: str, parts: list[str], kind: type) -> Json | None:
    values: list[Any] = []
    for part in parts:
        part = part.strip(" \x00")
        if not part:
            values.append(None)
            continue
        try:
            values.append(kind(float(part)) if kind is int and "." in part else kind(part))
        except ValueError:
            return None
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return _storable({"vr": vr, "Value": values})


def _storable(encoded: Json) -> Json:
    """`encoded` unless it is an IS value past 64 bits, which the index cannot hold (JSON and
    BSON integers are 64-bit: STOW answered 500) and no valid IS value, of at most 12
    characters (PS3.5 6.2), is: a ValueError then, so the instance is refused as not
    understood, like other malformed IS values."""
    if encoded["vr"] == "IS" and any(
        isinstance(v, int) and not -(2**63) <= v < 2**63 for v in encoded.get("Value", [])
    ):
        raise ValueError("An Integer String (IS) value has more than 12 characters and exceeds 64 bits")
    return encoded


def _person_names(parts: list[str]) -> Json:
    names: list[Any] = []
    for part in parts:
        part = part.rstrip(" ")
        groups = part.split("=")
        name: dict[str, str] = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        names.append(name)
    if len(names) == 1 and not parts[0].strip(" "):
        return {"vr": "PN"}
    return {"vr": "PN", "Value": names}


def swapped(data: bytes, unit: int) -> bytes:
    """`data` with the byte order of each `unit`-byte word reversed (a trailing odd byte,
    padding, kept)."""
    whole = len(data) - len(data) % unit
    return np.frombuffer(data, f">u{unit}", count=whole // unit).byteswap().tobytes() + data[whole:]
