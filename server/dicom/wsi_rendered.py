"""Rendered whole slide images (PS3.18 8.3.5, 10.4): a frame, or a region of a slide
level stitched from its tiles, as JPEG or PNG, so that a plain web page can show any part
of a slide.

`viewport=vw,vh,sx,sy,sw,sh` names the region in Total Pixel Matrix pixels of the
instance asked for (sx, sy its top-left corner, sw, sh its size, empty = to the edge; a
negative sw or sh flips the image) and the output is that region scaled to fit vw x vh,
aspect ratio kept. Without a region the whole matrix (or frame) is rendered. The region is
read from the lowest-resolution VOLUME level of the same series and pyramid that still has
the output's resolution, as a viewer would, so an overview of a 40,000-pixel level reads
a few tiles, not thousands. Tiles are byte-range reads at the offsets recorded at ingest,
decoded with wsidicom's decoders (JPEG, JPEG 2000, JPEG-LS, RLE; native tiles directly),
pasted into one array and cropped; tiles a TILED_SPARSE level lacks are white (black for
MONOCHROME2), as wsidicom shows them; samples of more than 8 bits are scaled by Bits
Stored. The focal plane is the middle one, the optical path the first. Stitching is ours:
wsidicom stitches only through its own sources (files or its DICOMweb client), which would
re-read the header of a level this server has already described at ingest.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.uid import UID
from wsidicom.codec import Decoder
from wsidicom.geometry import Size

from server.dicom import wado
from server.dicom.archive import Archive
from server.dicom.frames import FrameTable
from server.dicom.wsi import Slide

MAX_REGION_PIXELS = 4096 * 4096  # source pixels decoded for one rendered image


@dataclass(frozen=True, slots=True)
class Region:
    """A rectangle of a level's Total Pixel Matrix, and whether to flip it."""

    left: int
    top: int
    width: int
    height: int
    flip_x: bool = False
    flip_y: bool = False

    def scaled(self, factor_x: float, factor_y: float) -> Region:
        left, top = int(self.left * factor_x), int(self.top * factor_y)
        return Region(left, top, max(1, round(self.width * factor_x)), max(1, round(self.height * factor_y)),
                      self.flip_x, self.flip_y)


def region_of(options: wado.Rendering, width: int, height: int) -> Region:
    """The requested region of a width x height image (400 when outside it)."""
    if options.region is None:
        return Region(0, 0, width, height)
    sx, sy, sw, sh = options.region
    sw = width - sx if sw is None else sw
    sh = height - sy if sh is None else sh
    region = Region(sx, sy, abs(sw), abs(sh), sw < 0, sh < 0)
    if sx < 0 or sy < 0 or region.width == 0 or region.height == 0 or sx + region.width > width or sy + region.height > height:
        raise wado.BadRequest(f"The viewport region {sx},{sy},{sw},{sh} is not inside the {width}x{height} image")
    return region


def output_size(region: Region, viewport: tuple[int, int] | None) -> tuple[int, int]:
    if viewport is None:
        return region.width, region.height
    scale = min(viewport[0] / region.width, viewport[1] / region.height)
    return max(1, round(region.width * scale)), max(1, round(region.height * scale))


async def render(archive: Archive, table: FrameTable, frame: int | None, options: wado.Rendering) -> bytes:
    """A rendered frame (`frame`) or region of a WSI instance (`table.slide` is set)."""
    slide = table.slide
    assert slide is not None
    if frame is not None:
        wado.check_frames(table, [frame])
        return await asyncio.to_thread(_render_frame, archive, table, slide, frame, options)
    if slide.organization == "TILED_SPARSE" and slide.tiles is None:
        raise wado.NotAcceptable("The tiles of this TILED_SPARSE instance are not on a grid; only its frames can be rendered")
    if not table.locatable:
        raise wado.NotAcceptable("The frames of this instance cannot be located")
    region = region_of(options, slide.width, slide.height)
    size = output_size(region, options.viewport)
    table, slide, region = await _level_for(archive, table, slide, region, size)
    if region.width * region.height > MAX_REGION_PIXELS:
        raise wado.BadRequest(
            f"The region {region.width}x{region.height} exceeds {MAX_REGION_PIXELS} pixels at this "
            "resolution; request a smaller region or a smaller viewport"
        )
    return await asyncio.to_thread(_render_region, archive, table, slide, region, size, options)


async def _level_for(
    archive: Archive, table: FrameTable, slide: Slide, region: Region, size: tuple[int, int]
) -> tuple[FrameTable, Slide, Region]:
    """The lowest-resolution level of the same pyramid with at least the output's resolution."""
    if slide.image_type != "VOLUME" or size[0] >= region.width:
        return table, slide, region
    needed = slide.width * size[0] / region.width
    levels = await archive.index.find(
        "instance", {"st": table.study, "se": table.series, "wsi.type": "VOLUME", "wsi.pyramid": slide.pyramid},
        {"wsi.width": 1, "wsi.height": 1},
    )
    candidates = [d for d in levels if needed <= d["wsi"]["width"] < slide.width]
    if not candidates:
        return table, slide, region
    best = min(candidates, key=lambda d: d["wsi"]["width"])
    level = await archive.frame_tables.get(best["_id"])
    if level is None or level.slide is None or not level.locatable:
        return table, slide, region
    scaled = region.scaled(level.slide.width / slide.width, level.slide.height / slide.height)
    clipped = Region(scaled.left, scaled.top, min(scaled.width, level.slide.width - scaled.left),
                     min(scaled.height, level.slide.height - scaled.top), scaled.flip_x, scaled.flip_y)
    return level, level.slide, clipped


async def smallest_level(archive: Archive, study: str, series: str) -> str | None:
    """The SOP Instance UID of a slide series' lowest-resolution VOLUME level, if any."""
    levels = await archive.index.find("instance", {"st": study, "se": series, "wsi.type": "VOLUME"},
                                      {"wsi.width": 1}, limit=1, sort=[("wsi.width", 1)])
    return levels[0]["_id"] if levels else None


def _decoder(table: FrameTable, slide: Slide) -> Decoder | None:
    """wsidicom's decoder for compressed tiles (None: native tiles, read by `_tile`)."""
    if not UID(table.transfer_syntax).is_encapsulated:
        if slide.allocated not in (8, 16):
            raise wado.NotAcceptable(f"Native tiles of {slide.allocated} bits allocated are not rendered")
        return None
    try:
        return Decoder.create(UID(table.transfer_syntax), slide.samples, slide.bits,
                              Size(slide.tile_width, slide.tile_height), slide.photometric)
    except ValueError as exc:
        raise wado.NotAcceptable(f"The tiles cannot be decoded for rendering: {exc}") from None


def _tile(archive: Archive, table: FrameTable, slide: Slide, decoder: Decoder | None, number: int) -> np.ndarray:
    """One tile's pixels: native frames by their Bits Allocated (wsidicom's decoder takes
    12 bits stored in 16 for 8), compressed ones by wsidicom's decoders."""
    data = b"".join(archive.blobs.read_range(table.blob, offset, length) for offset, length in table.ranges(number))
    if decoder is None:
        shape = (slide.tile_height, slide.tile_width) + ((slide.samples,) if slide.samples > 1 else ())
        return np.frombuffer(data, dtype="<u2" if slide.allocated == 16 else np.uint8).reshape(shape)
    try:
        return np.asarray(decoder.decode(data))
    except Exception as exc:  # codecs raise their own kinds on corrupt data
        raise wado.NotAcceptable(f"Frame {number} cannot be decoded: {exc}") from None


def _blank(slide: Slide) -> int:
    return 0 if slide.photometric == "MONOCHROME2" else 255


def read_region(archive: Archive, table: FrameTable, slide: Slide, region: Region) -> np.ndarray:
    """The pixels of a region of one level, stitched from its tiles."""
    decoder = _decoder(table, slide)
    plane = _middle_plane(slide)
    tw, th = slide.tile_width, slide.tile_height
    first_column, last_column = region.left // tw, (region.left + region.width - 1) // tw
    first_row, last_row = region.top // th, (region.top + region.height - 1) // th
    shape = ((last_row - first_row + 1) * th, (last_column - first_column + 1) * tw)
    canvas: np.ndarray | None = None
    for row in range(first_row, last_row + 1):
        for column in range(first_column, last_column + 1):
            number = slide.frame_at(column, row, plane, 0)
            if number == 0:
                continue
            tile = _tile(archive, table, slide, decoder, number)
            if canvas is None:
                canvas = np.full(shape + tile.shape[2:], _blank(slide), dtype=tile.dtype)
            y, x = (row - first_row) * th, (column - first_column) * tw
            part = tile[:th, :tw]  # some writers encode edge tiles smaller than the frame
            canvas[y:y + part.shape[0], x:x + part.shape[1]] = part
    if canvas is None:  # every tile of the region is missing
        canvas = np.full(shape + ((slide.samples,) if slide.samples > 1 else ()), _blank(slide), dtype=np.uint8)
    top, left = region.top - first_row * th, region.left - first_column * tw
    return canvas[top:top + region.height, left:left + region.width]


def _middle_plane(slide: Slide) -> int:
    middle = (slide.planes[0] + slide.planes[-1]) / 2
    return min(range(len(slide.planes)), key=lambda i: abs(slide.planes[i] - middle))


def _render_region(archive: Archive, table: FrameTable, slide: Slide, region: Region,
                   size: tuple[int, int], options: wado.Rendering) -> bytes:
    return _encode(_eight_bits(read_region(archive, table, slide, region), slide), region, size, options)


def _render_frame(archive: Archive, table: FrameTable, slide: Slide, frame: int, options: wado.Rendering) -> bytes:
    pixels = _tile(archive, table, slide, _decoder(table, slide), frame)
    region = region_of(options, pixels.shape[1], pixels.shape[0])
    crop = pixels[region.top:region.top + region.height, region.left:region.left + region.width]
    return _encode(_eight_bits(crop, slide), region, output_size(region, options.viewport), options)


def _eight_bits(pixels: np.ndarray, slide: Slide) -> np.ndarray:
    """Samples of more than 8 bits (fluorescence) scaled to 8 by their Bits Stored."""
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels.astype(np.uint32) >> max(0, slide.bits - 8)).clip(0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, region: Region, size: tuple[int, int], options: wado.Rendering) -> bytes:
    if region.flip_x:
        pixels = pixels[:, ::-1]
    if region.flip_y:
        pixels = pixels[::-1]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, "JPEG", quality=options.quality)
    return out.getvalue()
