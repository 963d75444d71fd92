"""WSI ingest: the pyramid structure recorded per instance, frames served byte for byte as
in the files sent (whatever the offset table), refusals of truncated and inconsistent
slides without a trace, and bounded memory while a large slide is parsed."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from server.dicom.instance import Refused, parse
from tests.conftest import start_server, stop_server
from tests.dicom.conftest import dicom_port, multipart_body
from tests.dicom.test_wado import parts
from tests.wsi import slides
from tests.wsi.conftest import MISSING

ANY_SYNTAX = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


def test_pyramid_structure_is_recorded(db, stored_slides):
    full = {d["wsi"]["width"]: d for d in db.dicom_instances.find({"se": stored_slides["jpeg"].series})}
    assert {d["wsi"]["type"] for d in full.values()} == {"VOLUME", "LABEL", "OVERVIEW"}
    base = full[1300]["wsi"]
    assert base["organization"] == "TILED_FULL" and base["height"] == 1000
    assert base["tile"] == [256, 256] and base["frames"] == 24 and base["missing"] == 0
    assert base["planes"] == [0.0] and base["paths"] == ["0"] and base["spacing"] == pytest.approx([0.00025, 0.00025])
    assert base["pyramid"] and {d["wsi"]["pyramid"] for d in full.values() if d["wsi"]["type"] == "VOLUME"} == {base["pyramid"]}
    assert sorted(w for w, d in full.items() if d["wsi"]["type"] == "VOLUME") == [163, 325, 650, 1300]
    sparse = {d["wsi"]["width"]: d["wsi"] for d in db.dicom_instances.find({"se": stored_slides["sparse"].series})}
    assert sparse[1300]["organization"] == "TILED_SPARSE" and "tiles" in sparse[1300]
    assert sparse[1300]["missing"] == len(MISSING[0]) and sparse[650]["missing"] == len(MISSING[1])
    assert sparse[1300]["frames"] == 24 - len(MISSING[0])


def _source_frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    count = int(ds.get("NumberOfFrames", 1))
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(count)]


@pytest.mark.parametrize("name", ["jpeg", "jpeg2000", "native", "no-offset-table", "sparse"])
def test_frames_are_the_source_frames(http, stored_slides, name):
    stored = stored_slides[name]
    for path in stored.files:
        expected = _source_frames(path)
        numbers = ",".join(str(n) for n in range(1, len(expected) + 1))
        response = http.get(f"{stored.instance_url(path)}/frames/{numbers}", headers=ANY_SYNTAX)
        assert parts(response) == expected, path.name
    one = http.get(f"{stored.instance_url(stored.files[0])}/frames/1", headers=ANY_SYNTAX)
    assert parts(one) == _source_frames(stored.files[0])[:1]


def _stow(http, data: bytes) -> dict:
    body, content_type = multipart_body([data])
    response = http.post("studies", content=body, headers={"Content-Type": content_type})
    return {"status": response.status_code, "json": response.json() if response.content else {}}


def _reason(answer: dict) -> int:
    return answer["json"]["00081198"]["Value"][0]["00081197"]["Value"][0]


def _renamed(path: Path) -> pydicom.Dataset:
    """A copy of a stored slide level as a new instance of a new series."""
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_truncated_slide_is_refused_without_trace(http, db, server, slide_files):
    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    ds = _renamed(base)
    data = _bytes(ds)
    answer = _stow(http, data[: len(data) * 2 // 3])
    assert answer["status"] == 409 and _reason(answer) == 0xC000
    assert db.dicom_instances.find_one({"_id": ds.SOPInstanceUID}) is None
    assert not list((server.data_dir / "dicom").rglob(f"{ds.SOPInstanceUID}.*"))
    assert not list((server.data_dir / "dicom" / ".incoming").iterdir())


def _with_wrong_frame_count(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.TotalPixelMatrixColumns = 2000  # 8 x 4 tiles, but 24 frames
    return ds


def _sparse_item_missing(ds: pydicom.Dataset) -> pydicom.Dataset:
    sparse = slides.to_sparse(ds, set())
    del sparse.PerFrameFunctionalGroupsSequence[-1]
    return sparse


def _sparse_outside(ds: pydicom.Dataset) -> pydicom.Dataset:
    sparse = slides.to_sparse(ds, set())
    sparse.PerFrameFunctionalGroupsSequence[0].PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix = 5001
    return sparse


def _sparse_twice(ds: pydicom.Dataset) -> pydicom.Dataset:
    sparse = slides.to_sparse(ds, set())
    first, second = (item.PlanePositionSlideSequence[0] for item in sparse.PerFrameFunctionalGroupsSequence[:2])
    second.ColumnPositionInTotalImagePixelMatrix = first.ColumnPositionInTotalImagePixelMatrix
    second.RowPositionInTotalImagePixelMatrix = first.RowPositionInTotalImagePixelMatrix
    return sparse


@pytest.mark.parametrize("broken", [_with_wrong_frame_count, _sparse_item_missing, _sparse_outside, _sparse_twice])
def test_slides_whose_tiles_cannot_be_placed_are_refused(http, db, slide_files, broken):
    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    ds = broken(_renamed(base))
    answer = _stow(http, _bytes(ds))
    assert answer["status"] == 409 and _reason(answer) == 0xA900, answer
    assert db.dicom_instances.find_one({"_id": ds.SOPInstanceUID}) is None


def test_tiles_off_the_grid_are_stored_and_served_by_frame(http, slide_files):
    """Valid DICOM whose sparse tiles do not sit on the tile grid: frames only."""
    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    ds = slides.to_sparse(_renamed(base), set())
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix = 11
    answer = _stow(http, _bytes(ds))
    assert answer["status"] == 200
    url = f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert parts(http.get(f"{url}/frames/2", headers=ANY_SYNTAX))[0].startswith(b"\xff\xd8")
    assert http.get(f"{url}/rendered", params={"viewport": "100,100"}).status_code == 406


def _large_slide(path: Path, base: Path, across: int, down: int) -> Path:
    """A TILED_FULL level of across x down 64 KB JPEG frames without offset table."""
    ds = pydicom.dcmread(base)
    frame = max(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)), key=len)
    tile = frame + b"\0" * (64 * 1024 - len(frame))  # padding after the EOI marker
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = across * 256, down * 256
    ds.NumberOfFrames = across * down
    ds.PixelData = encapsulate([tile] * (across * down), has_bot=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_large_slide_without_offset_table_is_parsed_in_small_memory(tmp_path, slide_files):
    """128 MB of tiles, no Basic or Extended Offset Table: the fragments are scanned from
    the file, never read whole (Python allocations stay far below the instance size)."""
    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    path = _large_slide(tmp_path / "large.dcm", base, 64, 32)
    assert path.stat().st_size > 128 * 1024 * 1024
    tracemalloc.start()
    try:
        parsed = parse(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed.frames is not None and parsed.frames.count == 2048
    assert parsed.frames.fragments is not None and parsed.frames.fragments[-1][1] == 64 * 1024
    assert peak < 32 * 1024 * 1024, f"parsing held {peak} bytes"


def _peak_memory(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def test_a_large_slide_by_c_store_is_never_held_in_memory(mongod, tmp_path, slide_files, monkeypatch):
    """A 256 MB level sent by C-STORE to a fresh server, then retrieved: the server's peak
    memory grows by far less than the instance (pynetdicom writes the received PDUs to a
    file; retrieval streams it; transcoding it is refused)."""
    from pynetdicom import AE, _config

    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    path = _large_slide(tmp_path / "large.dcm", base, 64, 64)
    live = start_server(mongod.uri, tmp_path / "server")
    try:
        before = _peak_memory(live.process.pid)
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the sender streams too
        ae = AE(ae_title="WSITEST")
        ae.add_requested_context(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID), "1.2.840.10008.1.2.4.50")
        assoc = ae.associate("127.0.0.1", dicom_port(live), ae_title="KUROSHIO")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(path).Status == 0
        finally:
            assoc.release()
        grown = _peak_memory(live.process.pid) - before
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        url = (f"{live.base_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}")
        as_stored = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        with httpx.stream("GET", url, headers={"Accept": as_stored}, timeout=120) as response:
            assert response.status_code == 200
            assert sum(len(chunk) for chunk in response.iter_bytes()) > path.stat().st_size
        # decoding a slide level to send it uncompressed would take gigabytes: 406
        assert httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}).status_code == 406
        assert _peak_memory(live.process.pid) - before < 96 * 1024 * 1024
    finally:
        stop_server(live)
    assert path.stat().st_size > 256 * 1024 * 1024
    assert grown < 96 * 1024 * 1024, f"the server's peak memory grew by {grown >> 20} MB"


def test_parse_refuses_truncated_files_directly(tmp_path, slide_files):
    base = max(slide_files["jpeg"], key=lambda p: p.stat().st_size)
    with pytest.raises(Refused) as refused:
        parse(slides.truncate(base, tmp_path))
    assert refused.value.reason == 0xC000


def test_frames_in_another_syntax_of_the_same_media_type_are_406(http, stored_slides):
    stored = stored_slides["jpeg"]
    url = f"{stored.instance_url(stored.files[0])}/frames/1"
    jpeg = 'multipart/related; type="image/jpeg"; transfer-syntax='
    assert http.get(url, headers={"Accept": jpeg + "1.2.840.10008.1.2.4.50"}).status_code == 200
    assert http.get(url, headers={"Accept": jpeg + "1.2.840.10008.1.2.4.70"}).status_code == 406
    assert http.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'}).status_code == 406
    raw = http.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert raw.status_code == 200 and len(parts(raw)[0]) == 256 * 256 * 3
