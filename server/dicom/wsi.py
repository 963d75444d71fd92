"""Whole slide images (PS3.3 A.32.8, VL Whole Slide Microscopy Image IOD): the slide
description recorded with each WSI instance at ingest.

A slide is a pyramid of instances in one series: each VOLUME instance is one resolution
level (a Total Pixel Matrix cut into tiles, one tile per frame), beside LABEL, OVERVIEW and
THUMBNAIL images. `describe` reads, from the DICOM JSON computed once at ingest, what a
reader needs to find a tile without parsing the instance again: the image type, the pyramid,
the total matrix and tile sizes, the focal planes and optical paths, the dimension
organization, and where each tile is. TILED_FULL frames follow a fixed order (PS3.3
C.8.12.4.1.3: columns, then rows, then focal planes, then optical paths), so a tile's frame
is arithmetic; TILED_SPARSE frames carry their position in the Per-Frame Functional Groups,
and the map from tile to frame is built here once and stored (zlib-compressed int32 frame
numbers, 0 for a missing tile). The Specimen module's identifiers are recorded too, for
the FHIR Specimen bridge (specimen.py).

Why not wsidicom here: its `WsiDataset` needs a pydicom Dataset of the whole header (for
TILED_SPARSE, tens of thousands of per-frame items) and builds its tile index on first use
in memory; the index must answer a tile request from the stored description alone.
The description is checked against the IOD where a reader would otherwise misplace tiles
(refused with 0xA900): TILED_FULL frame counts, per-frame positions outside the matrix.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bson import Binary
from pydicom.datadict import tag_for_keyword

from server.dicom.instance import DOES_NOT_MATCH_SOP_CLASS, ParsedInstance, Refused

VL_WHOLE_SLIDE_MICROSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.6"
IMAGE_TYPES = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")
# wsidicom and wsidicomizer write this for a required identifier they were not given.
PLACEHOLDER_IDENTIFIERS = {"", "unknown"}

Json = dict[str, Any]


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


T = {
    keyword: _tag(keyword)
    for keyword in (
        "ImageType", "PyramidUID", "DimensionOrganizationType", "TotalPixelMatrixColumns",
        "TotalPixelMatrixRows", "TotalPixelMatrixFocalPlanes", "NumberOfOpticalPaths",
        "OpticalPathSequence", "OpticalPathIdentifier", "OpticalPathIdentificationSequence",
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence",
        "PixelSpacing", "SpacingBetweenSlices", "TotalPixelMatrixOriginSequence",
        "ZOffsetInSlideCoordinateSystem", "PlanePositionSlideSequence",
        "ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix", "Rows",
        "Columns", "NumberOfFrames", "PhotometricInterpretation", "SamplesPerPixel", "BitsStored", "BitsAllocated",
        "ContainerIdentifier", "IssuerOfTheContainerIdentifierSequence", "ContainerTypeCodeSequence",
        "SpecimenDescriptionSequence", "SpecimenIdentifier", "IssuerOfTheSpecimenIdentifierSequence",
        "SpecimenUID", "SpecimenTypeCodeSequence", "SpecimenShortDescription",
        "LocalNamespaceEntityID", "UniversalEntityID", "UniversalEntityIDType", "CodeValue",
        "CodingSchemeDesignator", "CodeMeaning",
    )
}


# --- reading DICOM JSON -----------------------------------------------------------------


def values(attributes: Json, keyword: str) -> list[Any]:
    element = attributes.get(T[keyword]) or {}
    return [v for v in element.get("Value") or [] if v is not None]


def first(attributes: Json, keyword: str) -> Any:
    found = values(attributes, keyword)
    return found[0] if found else None


def text(attributes: Json, keyword: str) -> str:
    value = first(attributes, keyword)
    return str(value).strip() if value is not None else ""


def item(attributes: Json, keyword: str) -> Json:
    """The first item of a sequence ({} when absent)."""
    items = values(attributes, keyword)
    return items[0] if items and isinstance(items[0], dict) else {}


def _positive(attributes: Json, keyword: str, default: int | None = None) -> int:
    value = first(attributes, keyword)
    if value is None and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"A whole slide image needs a positive {keyword}") from None
    if number < 1:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"A whole slide image needs a positive {keyword}, not {number}")
    return number


def _z(value: Any) -> float:
    """A focal plane's Z offset in micrometres, rounded as wsidicom rounds it."""
    return round(float(value), 3)


# --- the slide description --------------------------------------------------------------


@dataclass(slots=True)
class Slide:
    """What the index records about one WSI instance (one level, label or overview)."""

    image_type: str
    pyramid: str | None
    organization: str  # TILED_FULL or TILED_SPARSE
    width: int  # Total Pixel Matrix Columns
    height: int
    tile_width: int  # Columns
    tile_height: int
    planes: list[float]  # focal planes, Z in micrometres
    paths: list[str]  # optical path identifiers
    spacing: list[float] | None  # mm per pixel (row spacing, column spacing)
    photometric: str
    samples: int
    bits: int  # Bits Stored
    allocated: int  # Bits Allocated
    frames: int
    tiles: np.ndarray | None = None  # TILED_SPARSE: frame number by (path, plane, row, column)
    specimen: Json = field(default_factory=dict)

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def down(self) -> int:
        return -(-self.height // self.tile_height)

    def frame_at(self, column: int, row: int, plane: int = 0, path: int = 0) -> int:
        """The frame number (1-based) of a tile, 0 when a sparse slide lacks it."""
        if self.tiles is not None:
            return int(self.tiles[path, plane, row, column])
        return ((path * len(self.planes) + plane) * self.down + row) * self.across + column + 1

    @property
    def missing(self) -> int:
        return int((self.tiles == 0).sum()) if self.tiles is not None else 0

    def document(self) -> Json:
        doc: Json = {
            "type": self.image_type, "pyramid": self.pyramid, "organization": self.organization,
            "width": self.width, "height": self.height, "tile": [self.tile_width, self.tile_height],
            "planes": self.planes, "paths": self.paths, "spacing": self.spacing,
            "photometric": self.photometric, "samples": self.samples, "bits": self.bits,
            "allocated": self.allocated, "frames": self.frames, "missing": self.missing, "specimen": self.specimen,
        }
        if self.tiles is not None:
            doc["tiles"] = Binary(zlib.compress(self.tiles.astype("<i4").tobytes(), 1))
        return doc

    @classmethod
    def from_document(cls, doc: Json) -> Slide:
        slide = cls(
            doc["type"], doc.get("pyramid"), doc["organization"], doc["width"], doc["height"],
            doc["tile"][0], doc["tile"][1], doc["planes"], doc["paths"], doc.get("spacing"),
            doc["photometric"], doc["samples"], doc["bits"], doc["allocated"], doc["frames"],
            specimen=doc.get("specimen", {}),
        )
        if doc.get("tiles") is not None:
            flat = np.frombuffer(zlib.decompress(doc["tiles"]), dtype="<i4")
            slide.tiles = flat.reshape(len(slide.paths), len(slide.planes), slide.down, slide.across)
        return slide


def is_slide(sop_class: str) -> bool:
    return sop_class == VL_WHOLE_SLIDE_MICROSCOPY


def describe(parsed: ParsedInstance) -> Slide | None:
    """The slide description of a WSI instance (None for other SOP classes); Refused when
    its tiles cannot be placed as the IOD says."""
    if not is_slide(parsed.sop_class):
        return None
    attributes = parsed.attributes
    image_type = values(attributes, "ImageType")
    kind = str(image_type[2]).strip().upper() if len(image_type) > 2 else "VOLUME"
    if kind not in IMAGE_TYPES:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"Image Type value 3 {kind!r} is not one of {', '.join(IMAGE_TYPES)}")
    per_frame = values(attributes, "PerFrameFunctionalGroupsSequence")
    organization = text(attributes, "DimensionOrganizationType").upper()
    if organization not in ("TILED_FULL", "TILED_SPARSE"):
        organization = "TILED_SPARSE" if per_frame else "TILED_FULL"
    shared = item(attributes, "SharedFunctionalGroupsSequence")
    measures = item(shared, "PixelMeasuresSequence")
    spacing = [float(v) for v in values(measures, "PixelSpacing")] or None
    slide = Slide(
        image_type=kind,
        pyramid=text(attributes, "PyramidUID") or None,
        organization=organization,
        width=_positive(attributes, "TotalPixelMatrixColumns"),
        height=_positive(attributes, "TotalPixelMatrixRows"),
        tile_width=_positive(attributes, "Columns"),
        tile_height=_positive(attributes, "Rows"),
        planes=[],
        paths=[str(text(path, "OpticalPathIdentifier")) for path in values(attributes, "OpticalPathSequence")],
        spacing=spacing if spacing and len(spacing) == 2 else None,
        photometric=text(attributes, "PhotometricInterpretation"),
        samples=_positive(attributes, "SamplesPerPixel", 1),
        bits=_positive(attributes, "BitsStored", 8),
        allocated=_positive(attributes, "BitsAllocated", 8),
        frames=_positive(attributes, "NumberOfFrames", 1),
        specimen=specimen_of(attributes),
    )
    if organization == "TILED_FULL":
        _full(slide, attributes, measures)
    else:
        _sparse(slide, per_frame, shared)
    return slide


def _full(slide: Slide, attributes: Json, measures: Json) -> None:
    """TILED_FULL: planes from the origin and the spacing between slices; every tile present."""
    planes = _positive(attributes, "TotalPixelMatrixFocalPlanes", 1)
    paths = _positive(attributes, "NumberOfOpticalPaths", 1)
    origin = item(attributes, "TotalPixelMatrixOriginSequence")
    z0 = first(origin, "ZOffsetInSlideCoordinateSystem") or 0
    between = first(measures, "SpacingBetweenSlices") or 0
    slide.planes = [_z(z0 + plane * float(between) * 1000) for plane in range(planes)]
    slide.paths = (slide.paths + [str(i) for i in range(len(slide.paths), paths)])[:paths]
    expected = slide.across * slide.down * planes * paths
    if slide.frames != expected:
        raise Refused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"TILED_FULL with {slide.across}x{slide.down} tiles, {planes} focal plane(s) and {paths} "
            f"optical path(s) needs {expected} frames, not {slide.frames}",
        )


def _sparse(slide: Slide, per_frame: list[Json], shared: Json) -> None:
    """TILED_SPARSE: each frame's position from its Plane Position (Slide) item."""
    if len(per_frame) != slide.frames:
        raise Refused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"TILED_SPARSE needs one Per-Frame Functional Groups item per frame: "
            f"{len(per_frame)} items for {slide.frames} frames",
        )
    shared_path = text(item(shared, "OpticalPathIdentificationSequence"), "OpticalPathIdentifier")
    positions = []
    for number, frame in enumerate(per_frame, start=1):
        position = item(frame, "PlanePositionSlideSequence") or item(shared, "PlanePositionSlideSequence")
        column = first(position, "ColumnPositionInTotalImagePixelMatrix")
        row = first(position, "RowPositionInTotalImagePixelMatrix")
        if column is None or row is None:
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"Frame {number} has no position in the Total Pixel Matrix")
        z = _z(first(position, "ZOffsetInSlideCoordinateSystem") or 0)
        path = text(item(frame, "OpticalPathIdentificationSequence"), "OpticalPathIdentifier") or shared_path or "0"
        positions.append((int(column) - 1, int(row) - 1, z, path))
    slide.planes = sorted({z for _, _, z, _ in positions})
    slide.paths = slide.paths + sorted({p for *_, p in positions} - set(slide.paths))
    if not slide.paths:
        slide.paths = ["0"]
    plane_index = {z: i for i, z in enumerate(slide.planes)}
    path_index = {p: i for i, p in enumerate(slide.paths)}
    tiles = np.zeros((len(slide.paths), len(slide.planes), slide.down, slide.across), dtype=np.int32)
    for number, (x, y, z, path) in enumerate(positions, start=1):
        if not (0 <= x < slide.width and 0 <= y < slide.height):
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"Frame {number} lies outside the Total Pixel Matrix")
        if x % slide.tile_width or y % slide.tile_height:
            return  # tiles off the tile grid: frames are served, regions are not rendered
        cell = (path_index[path], plane_index[z], y // slide.tile_height, x // slide.tile_width)
        if tiles[cell]:
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"Frames {tiles[cell]} and {number} are the same tile")
        tiles[cell] = number
    slide.tiles = tiles


# --- the Specimen module ----------------------------------------------------------------


def _identifier(attributes: Json, value_keyword: str, issuer_keyword: str) -> Json | None:
    value = text(attributes, value_keyword)
    if value.lower() in PLACEHOLDER_IDENTIFIERS:
        return None
    issuer = item(attributes, issuer_keyword)
    found: Json = {"value": value}
    universal = text(issuer, "UniversalEntityID")
    local = text(issuer, "LocalNamespaceEntityID")
    if universal:
        found["issuer"] = universal
        found["issuer_type"] = text(issuer, "UniversalEntityIDType")
    elif local:
        found["issuer"] = local
    return found


def _code(attributes: Json, keyword: str) -> Json | None:
    code = item(attributes, keyword)
    if not text(code, "CodeValue"):
        return None
    return {"code": text(code, "CodeValue"), "scheme": text(code, "CodingSchemeDesignator"),
            "meaning": text(code, "CodeMeaning")}


def specimen_of(attributes: Json) -> Json:
    """The slide's container and the specimens it holds, with identifiers that are known."""
    specimens = []
    for description in values(attributes, "SpecimenDescriptionSequence"):
        identifier = _identifier(description, "SpecimenIdentifier", "IssuerOfTheSpecimenIdentifierSequence")
        if identifier is None:
            continue
        identifier["uid"] = text(description, "SpecimenUID") or None
        identifier["type"] = _code(description, "SpecimenTypeCodeSequence")
        identifier["description"] = text(description, "SpecimenShortDescription") or None
        specimens.append(identifier)
    return {
        "container": _identifier(attributes, "ContainerIdentifier", "IssuerOfTheContainerIdentifierSequence"),
        "container_type": _code(attributes, "ContainerTypeCodeSequence"),
        "specimens": specimens,
    }
