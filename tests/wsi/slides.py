"""Synthetic whole-slide images for the WSI tests and the benchmark.

A slide starts as an OME-TIFF written with tifffile (JPEG tiles, a label and a macro
image as named series, which opentile reads as LABEL and OVERVIEW), is converted by
wsidicomizer into a DICOM VL Whole Slide Microscopy pyramid (`add_missing_levels`), and
can then be reshaped with pydicom into what wsidicom does not write itself: TILED_SPARSE
with missing tiles (`to_sparse`) and truncated files.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

TILE = 256


def pixels(top: int, left: int, height: int, width: int) -> np.ndarray:
    """The slide's RGB pixels in a window: smooth colour gradients with stripes and rings,
    so every tile differs and a misplaced tile shows."""
    y, x = np.mgrid[top:top + height, left:left + width]
    red = (x * 7 + y) % 256
    green = (y * 5 + (x // 3)) % 256
    blue = np.where(((x - 600) ** 2 + (y - 400) ** 2) % 9000 < 3000, 40, 220)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _tiles(width: int, height: int, tile: int, variants: list[bytes] | None) -> Iterator[np.ndarray | bytes]:
    index = 0
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            if variants is not None:
                yield variants[(top // tile * 31 + left // tile * 17) % len(variants)]
            else:
                block = np.zeros((tile, tile, 3), np.uint8)
                h, w = min(tile, height - top), min(tile, width - left)
                block[:h, :w] = pixels(top, left, h, w)
                yield block
            index += 1


def write_tiff(path: Path, width: int, height: int, tile: int = TILE, repeat_tiles: int = 0) -> Path:
    """An OME-TIFF slide at 0.25 um/pixel with JPEG tiles, a label and a macro image.

    `repeat_tiles` > 0 writes that many pre-encoded tile variants over and over (for the
    benchmark's 40,000-pixel slide, where encoding every tile would take minutes)."""
    variants = None
    if repeat_tiles:
        variants = [
            _jpeg(pixels(i * 37, i * 53, tile, tile)) for i in range(repeat_tiles)
        ]
    options = {"tile": (tile, tile), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            _tiles(width, height, tile, variants), shape=(height, width, 3), dtype=np.uint8,
            metadata={"Name": "image", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                      "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"},
            **options,
        )
        label = np.full((200, 300, 3), 235, np.uint8)
        label[60:140, 40:260] = (20, 20, 160)
        # one strip each: opentile passes only the first strip of an associated image on
        tif.write(label, metadata={"Name": "label"}, photometric="rgb", compression="jpeg", rowsperstrip=200)
        macro = np.full((300, 800, 3), 250, np.uint8)
        macro[50:250, 300:700] = (200, 120, 160)
        tif.write(macro, metadata={"Name": "macro"}, photometric="rgb", compression="jpeg", rowsperstrip=300)
    return path


def _jpeg(block: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(block, level=90))


@dataclass(frozen=True)
class Conversion:
    """One wsidicomizer conversion of the TIFF: where, and with what."""

    out: Path
    offset_table: str = "bot"
    encoding: str | None = None  # None: JPEG tiles copied; "jpeg2000-lossless": re-encoded
    patient_id: str | None = None
    specimen_id: str | None = None


def dicomize(tiff: Path, conversions: dict[str, Conversion], workers: int | None = None) -> dict[str, list[Path]]:
    """wsidicomizer's conversions of `tiff` into DICOM pyramids (one file per instance).

    They run in a child process: importing wsidicomizer switches pydicom into its "future"
    mode and enforce_valid_values for the whole process (dicomizer_source.py), which would
    change how the other tests' pydicom behaves."""
    request = {"tiff": str(tiff), "workers": workers,
               "conversions": {name: {**asdict(c), "out": str(c.out)} for name, c in conversions.items()}}
    done = subprocess.run([sys.executable, "-m", "tests.wsi.slides"], input=json.dumps(request), text=True,
                          capture_output=True, cwd=Path(__file__).resolve().parents[2], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wsidicomizer failed: {done.stderr[-3000:]}")
    return {name: [Path(p) for p in paths] for name, paths in json.loads(done.stdout).items()}


def _convert(tiff: Path, conversion: Conversion, workers: int | None) -> list[str]:
    from wsidicom.codec import Jpeg2kSettings
    from wsidicomizer import WsiDicomizer

    from server.dicom.wsi_import import metadata_for  # the same metadata `wsi import` writes

    encoding = Jpeg2kSettings(levels=[0]) if conversion.encoding == "jpeg2000-lossless" else None
    metadata = None
    if conversion.patient_id or conversion.specimen_id:
        metadata = metadata_for(conversion.patient_id, None, conversion.specimen_id)
    return WsiDicomizer.convert(
        tiff, conversion.out, metadata=metadata, tile_size=TILE, add_missing_levels=True,
        offset_table=conversion.offset_table, encoding=encoding, force_transcoding=encoding is not None,
        workers=workers,
    )


def kind(path: Path) -> str:
    """VOLUME, LABEL, OVERVIEW or THUMBNAIL (the third value of Image Type)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).ImageType[2])


def to_sparse(ds: Dataset, missing: set[int]) -> Dataset:
    """The same image as TILED_SPARSE: a Plane Position (Slide) item per frame, frames in
    reverse order (so arithmetic on TILED_FULL order would find the wrong tile), and the
    frames whose (0-based) TILED_FULL index is in `missing` left out."""
    count = int(ds.NumberOfFrames)
    across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    origin = ds.TotalPixelMatrixOriginSequence[0]
    kept = [i for i in reversed(range(count)) if i not in missing]
    items = []
    for index in kept:
        column = index % across * int(ds.Columns) + 1
        row = index // across * int(ds.Rows) + 1
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = column
        position.RowPositionInTotalImagePixelMatrix = row
        position.XOffsetInSlideCoordinateSystem = round(float(origin.XOffsetInSlideCoordinateSystem) + (row - 1) * spacing[0], 6)
        position.YOffsetInSlideCoordinateSystem = round(float(origin.YOffsetInSlideCoordinateSystem) + (column - 1) * spacing[1], 6)
        position.ZOffsetInSlideCoordinateSystem = 0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([position])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(kept)
    ds.PixelData = encapsulate([frames[i] for i in kept], has_bot=True)
    return ds


def to_native(ds: Dataset) -> Dataset:
    """The same image with uncompressed RGB frames (Explicit VR Little Endian), decoded by
    Pillow as wsidicom decodes them (wsidicom writes some edge tiles smaller than the
    frame; they are padded white)."""
    from PIL import Image
    from pydicom.uid import ExplicitVRLittleEndian

    count = int(ds.NumberOfFrames)
    frames = np.full((count, int(ds.Rows), int(ds.Columns), 3), 255, np.uint8)
    for index, data in enumerate(generate_frames(ds.PixelData, number_of_frames=count)):
        tile = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        frames[index, :tile.shape[0], :tile.shape[1]] = tile
    ds.PixelData = frames.tobytes()
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "RGB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        ds.pop(keyword, None)
    return ds


def derive_series(files: list[Path], out: Path, change: Callable[[Dataset, int], Dataset]) -> list[Path]:
    """A copy of a pyramid's VOLUME levels under a new series: `change(dataset, level)`
    (level 0 = base) makes each instance, which gets a new SOP Instance UID."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    volumes = sorted((p for p in files if kind(p) == "VOLUME"),
                     key=lambda p: -int(pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns))
    result = []
    for level, path in enumerate(volumes):
        ds = change(pydicom.dcmread(path), level)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        result.append(target)
    return result


def truncate(path: Path, out: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    target = out / f"truncated-{path.name}"
    target.write_bytes(data[: int(len(data) * keep)])
    return target


if __name__ == "__main__":  # the child process of `dicomize`
    job = json.load(sys.stdin)
    print(json.dumps({
        name: _convert(Path(job["tiff"]), Conversion(**{**c, "out": Path(c["out"])}), job["workers"])
        for name, c in job["conversions"].items()
    }))
