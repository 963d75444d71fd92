"""Rendered whole slide images: regions of a level stitched from tiles equal wsidicom's own
`read_region` of the local files (exactly as PNG, within JPEG tolerance as JPEG), a
downscaled viewport is read from the matching lower level, frames render, and malformed
viewports are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _base(stored):
    return max(stored.files, key=lambda p: p.stat().st_size)


REGIONS = [(0, 0, 512, 512), (200, 300, 700, 400), (1000, 700, 300, 300), (255, 255, 2, 2)]


@pytest.mark.parametrize("name", ["jpeg", "jpeg2000", "native", "sparse"])
@pytest.mark.parametrize("region", REGIONS)
def test_png_region_equals_wsidicom_read_region(http, stored_slides, name, region):
    stored = stored_slides[name]
    x, y, w, h = region
    url = f"{stored.instance_url(_base(stored))}/rendered"
    actual = _image(http.get(url, params={"viewport": f"{w},{h},{x},{y},{w},{h}"}, headers={"Accept": "image/png"}))
    with stored.open_local() as local:
        expected = np.asarray(local.read_region((x, y), 0, (w, h)))
    assert actual.shape == expected.shape
    assert np.array_equal(actual, expected)


def test_jpeg_region_is_within_jpeg_tolerance(http, stored_slides):
    stored = stored_slides["jpeg"]
    response = http.get(f"{stored.instance_url(_base(stored))}/rendered",
                        params={"viewport": "512,512,100,100,512,512", "quality": "95"})
    assert response.headers["content-type"] == "image/jpeg"
    actual = _image(response).astype(int)
    with stored.open_local() as local:
        expected = np.asarray(local.read_region((100, 100), 0, (512, 512))).astype(int)
    assert actual.shape == expected.shape
    psnr = 10 * np.log10(255**2 / np.mean((actual - expected) ** 2))
    assert psnr > 30, f"PSNR {psnr:.1f} dB"  # a JPEG of the same pixels, not other pixels
    assert np.mean((actual - np.roll(expected, 7, axis=1)) ** 2) > 4 * np.mean((actual - expected) ** 2)


def test_a_downscaled_viewport_reads_the_lower_level(http, stored_slides):
    """The whole base level in a 325x250 viewport is level 2 (325x250) as it is."""
    stored = stored_slides["jpeg"]
    whole = http.get(f"{stored.instance_url(_base(stored))}/rendered", params={"viewport": "325,325"},
                     headers={"Accept": "image/png"})
    with stored.open_local() as local:
        expected = np.asarray(local.read_region((0, 0), 2, (325, 250)))
    assert np.array_equal(_image(whole), expected)
    thumbnail = _image(http.get(f"studies/{stored.study}/series/{stored.series}/thumbnail",
                                headers={"Accept": "image/png"}))
    assert thumbnail.shape == (98, 128, 3)  # the slide's tissue (1300 x 1000), not its label
    with stored.open_local() as local:
        smallest = np.asarray(local.read_region((0, 0), 3, (163, 125)).resize((128, 98), Image.Resampling.LANCZOS))
    assert np.abs(thumbnail.astype(int) - smallest.astype(int)).mean() < 2


def test_missing_tiles_of_a_sparse_level_render_white(http, stored_slides):
    stored = stored_slides["sparse"]
    tile = _image(http.get(f"{stored.instance_url(_base(stored))}/rendered",
                           params={"viewport": "256,256,256,0,256,256"}, headers={"Accept": "image/png"}))
    assert (tile == 255).all()


def test_rendered_frame_and_flip(http, stored_slides):
    stored = stored_slides["native"]
    url = stored.instance_url(_base(stored))
    frame = _image(http.get(f"{url}/frames/2/rendered", headers={"Accept": "image/png"}))
    with stored.open_local() as local:
        expected = np.asarray(local.read_region((256, 0), 0, (256, 256)))
    assert np.array_equal(frame, expected)
    flipped = _image(http.get(f"{url}/frames/2/rendered", params={"viewport": "256,256,0,0,-256,256"},
                              headers={"Accept": "image/png"}))
    assert np.array_equal(flipped, expected[:, ::-1])
    small = _image(http.get(f"{url}/frames/2/rendered", params={"viewport": "64,64"}))
    assert small.shape == (64, 64, 3)


@pytest.mark.parametrize("viewport", ["10,10,0,0,2000,10", "10,10,-1,0,5,5", "10,10,0,0,0,5", "10,10,1,2", "a,b", "0,10"])
def test_bad_viewports_are_refused(http, stored_slides, viewport):
    stored = stored_slides["jpeg"]
    response = http.get(f"{stored.instance_url(_base(stored))}/rendered", params={"viewport": viewport})
    assert response.status_code == 400, response.text
    assert http.get(f"{stored.instance_url(_base(stored))}/frames/99/rendered").status_code == 404


def test_sixteen_bit_grayscale_is_scaled_to_eight(http, server, slide_files, tmp_path):
    """A fluorescence-like level (MONOCHROME2, 12 of 16 bits) renders by its Bits Stored."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from tests.wsi.conftest import stow

    source = pydicom.dcmread(_base_path(slide_files["native"]))
    rgb = np.frombuffer(source.PixelData, np.uint8).reshape(int(source.NumberOfFrames), 256, 256, 3)
    gray = (rgb.mean(axis=3) * 16).astype(np.uint16)  # 0..4080 in 12 bits
    source.PixelData = gray.tobytes()
    source["PixelData"].VR = "OW"
    source.SamplesPerPixel, source.PhotometricInterpretation = 1, "MONOCHROME2"
    source.BitsAllocated, source.BitsStored, source.HighBit = 16, 12, 11
    del source.PlanarConfiguration
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    source.SeriesInstanceUID, source.SOPInstanceUID = generate_uid(), generate_uid()
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    path = tmp_path / "gray.dcm"
    source.save_as(path, enforce_file_format=True)
    stow(server, [path])
    url = f"studies/{source.StudyInstanceUID}/series/{source.SeriesInstanceUID}/instances/{source.SOPInstanceUID}"
    region = http.get(f"{url}/rendered", params={"viewport": "300,200,200,100,300,200"}, headers={"Accept": "image/png"})
    assert region.status_code == 200, region.text
    actual = np.asarray(Image.open(io.BytesIO(region.content)))
    across = 1300 // 256 + 1
    plane = gray.reshape(-1, across, 256, 256).transpose(0, 2, 1, 3).reshape(-1, across * 256)
    assert np.array_equal(actual, (plane[100:300, 200:500] >> 4).astype(np.uint8))


def _base_path(files):
    return max(files, key=lambda p: p.stat().st_size)
