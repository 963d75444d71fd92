"""Slides for the WSI tests, built once per session (a few seconds): one OME-TIFF converted
by wsidicomizer into pyramids with JPEG tiles and a Basic Offset Table, JPEG 2000 tiles
and an Extended Offset Table, uncompressed tiles, and JPEG tiles with an empty offset
table; and a TILED_SPARSE copy of the JPEG pyramid with tiles missing. They are stored
on the shared live server, some by STOW-RS and some by C-STORE."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE
from wsidicom import WsiDicom, WsiDicomWebClient

from tests.conftest import LiveServer
from tests.dicom.conftest import dicom_port, http  # noqa: F401 (the DICOMweb client fixture)
from tests.wsi import slides

MISSING = {0: {1, 5, 7}, 1: {2}}  # level (0 = base) -> TILED_FULL indexes of absent tiles


@dataclass
class StoredSlide:
    name: str
    files: list[Path]
    study: str
    series: str

    def open_local(self) -> WsiDicom:
        return WsiDicom.open(self.files)

    def open_web(self, server: LiveServer, *more_series: str) -> WsiDicom:
        client = DICOMwebClient(url=f"{server.base_url}/dicomweb")
        return WsiDicom.open_web(FramesAsBytes(client), self.study, [self.series, *more_series])

    def instance_url(self, path: Path) -> str:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return f"studies/{self.study}/series/{self.series}/instances/{ds.SOPInstanceUID}"


class FramesAsBytes(WsiDicomWebClient):
    """wsidicom's web client, with each frame handed on as `bytes`.

    dicomweb-client 0.59 yields multipart parts as `bytearray`; wsidicom 0.31 (the last
    for Python 3.11) assigns an uncompressed frame to a pydicom PixelData, which turns a
    bytearray into a list and fails. Compressed frames are unaffected. A client-side
    defect, worked around here so that uncompressed slides are tested too."""

    def get_frames(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        return (bytes(frame) for frame in super().get_frames(*args, **kwargs))


def stow(server: LiveServer, files: list[Path]) -> None:
    client = DICOMwebClient(url=f"{server.base_url}/dicomweb")
    client.store_instances([pydicom.dcmread(f) for f in files])


def c_store(server: LiveServer, files: list[Path]) -> None:
    ae = AE(ae_title="WSITEST")
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", dicom_port(server), ae_title="KUROSHIO")
    assert assoc.is_established
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status.Status == 0, f"C-STORE of {path.name}: 0x{status.Status:04X}"
    finally:
        assoc.release()


def _stored(name: str, files: list[Path]) -> StoredSlide:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return StoredSlide(name, files, ds.StudyInstanceUID, ds.SeriesInstanceUID)


@pytest.fixture(scope="session")
def slide_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The DICOM files of each test slide, by name."""
    root = tmp_path_factory.mktemp("slides")
    tiff = slides.write_tiff(root / "slide.ome.tif", 1300, 1000)
    built = slides.dicomize(tiff, {
        "jpeg": slides.Conversion(root / "jpeg", patient_id="WSI-PAT-1", specimen_id="SPEC-1"),
        "jpeg2000": slides.Conversion(root / "j2k", offset_table="eot", encoding="jpeg2000-lossless"),
        "no-offset-table": slides.Conversion(root / "empty", offset_table="empty"),
    })
    # wsidicom writes TILED_FULL only, and its uncompressed small levels come out short;
    # these two are made from the JPEG pyramid with pydicom.
    built["sparse"] = slides.derive_series(built["jpeg"], root / "sparse", lambda ds, level: slides.to_sparse(ds, MISSING.get(level, set())))
    built["native"] = slides.derive_series(built["jpeg"], root / "native", lambda ds, level: slides.to_native(ds))
    return built


@pytest.fixture(scope="session")
def stored_slides(server: LiveServer, slide_files: dict[str, list[Path]]) -> dict[str, StoredSlide]:
    """Every test slide stored on the live server: by STOW-RS or by C-STORE."""
    by_c_store = {"sparse", "jpeg2000"}
    for name, files in slide_files.items():
        (c_store if name in by_c_store else stow)(server, files)
    return {name: _stored(name, files) for name, files in slide_files.items()}

