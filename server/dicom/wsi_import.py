"""`kuroshio wsi import`: a slide in a non-DICOM format (tiled TIFF, OME-TIFF, SVS, NDPI,
MRXS, ... whatever wsidicomizer reads through opentile, tiffslide or OpenSlide) converted
into a DICOM VL Whole Slide Microscopy pyramid and stored.

wsidicomizer does the conversion (tiles it can pass on are copied, the others encoded as
JPEG or JPEG 2000 as asked; missing pyramid levels are added down to one tile); the Patient
and the specimen named on the command line are written into every instance (Patient module;
Container Identifier and Specimen Description Sequence of the Specimen module), so the
FHIR bridge links the slide to the Patient's ImagingStudy and a Specimen. The files are then
sent by STOW-RS to the server's DICOMweb endpoint, streamed from disk, like any client's
upload: authorized, audited, indexed and reflected into FHIR by the one ingest path.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ENCODINGS = ("jpeg", "jpeg2000")
OFFSET_TABLES = ("bot", "eot", "empty")
CHUNK = 1024 * 1024


class SlideUnreadable(Exception):
    """The slide cannot be read or converted (a clear message for the command line)."""


def metadata_for(patient_id: str | None, patient_name: str | None, specimen_id: str | None) -> Any:
    """wsidicomizer metadata naming the Patient and the specimen (the slide and the one
    sample on it carry the specimen identifier)."""
    from wsidicom.metadata import Patient, Slide, SlideSample
    from wsidicomizer.metadata import WsiDicomizerMetadata

    slide = Slide(identifier=specimen_id, samples=[SlideSample(identifier=specimen_id)]) if specimen_id else None
    return WsiDicomizerMetadata(patient=Patient(identifier=patient_id, name=patient_name), slide=slide)


def _encoding(name: str) -> Any:
    from wsidicom.codec import Jpeg2kSettings, JpegSettings

    return Jpeg2kSettings() if name == "jpeg2000" else JpegSettings()


def convert(
    slide: Path,
    out: Path,
    metadata: Any,
    *,
    issuer: str | None = None,
    tile_size: int = 256,
    encoding: str = "jpeg",
    offset_table: str = "bot",
    workers: int | None = None,
) -> list[Path]:
    """The DICOM files of `slide` written into the new directory `out` (blocking)."""
    from pydicom import Dataset
    from wsidicomizer import WsiDicomizer

    extra = None
    if issuer:
        extra = Dataset()
        extra.IssuerOfPatientID = issuer
    try:
        wsi = WsiDicomizer.open(slide, metadata=metadata, tile_size=tile_size,
                                metadata_post_processor=extra, encoding=_encoding(encoding))
    except NotImplementedError as exc:
        raise SlideUnreadable(f"{slide} is not a slide format wsidicomizer can read ({exc})") from None
    except Exception as exc:  # the readers raise their own kinds on damaged files
        raise SlideUnreadable(f"{slide} cannot be read: {exc}") from None
    with wsi:
        out.mkdir(parents=True, exist_ok=False)
        files = wsi.save(out, workers=workers, offset_table=offset_table, add_missing_levels=True)
    return [Path(str(f)) for f in files]


def written_bytes(directory: Path) -> int:
    """How much of the conversion is on disk (for the progress display)."""
    return sum(f.stat().st_size for f in directory.glob("*") if f.is_file()) if directory.is_dir() else 0


@dataclass
class Stored:
    """What the server answered to the STOW-RS request."""

    status: int
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs
    failed: list[tuple[str, int]] = field(default_factory=list)  # (SOP Instance UID, reason)
    study: str | None = None
    message: str = ""


def _body(files: list[Path], boundary: str, progress: Callable[[int], None]) -> Iterator[bytes]:
    """The multipart/related body, read from disk a chunk at a time."""
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                progress(len(chunk))
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def store(files: list[Path], dicomweb: str, progress: Callable[[int], None], timeout: float = 3600) -> Stored:
    """Send the files by STOW-RS in one request (streamed) and read the answer."""
    boundary = uuid.uuid4().hex
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = httpx.post(
        f"{dicomweb.rstrip('/')}/studies", content=_body(files, boundary, progress),
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"}, timeout=timeout,
    )
    result = Stored(response.status_code)
    if "json" not in response.headers.get("content-type", ""):
        result.message = response.text[:500]
        return result
    body = response.json()
    for item in body.get("00081199", {}).get("Value", []):
        result.stored += item.get("00081155", {}).get("Value", [])
    for item in body.get("00081198", {}).get("Value", []):
        sop = (item.get("00081155", {}).get("Value") or ["?"])[0]
        reason = (item.get("00081197", {}).get("Value") or [0])[0]
        result.failed.append((sop, reason))
    url = (body.get("00081190", {}).get("Value") or [None])[0]
    result.study = url.rsplit("/", 1)[-1] if url else None
    return result
