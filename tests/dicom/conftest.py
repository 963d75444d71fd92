"""Fixtures for the DICOM tests: a DICOMweb client on the shared live server, its DIMSE
port, and instances made on the fly (pydicom) or taken from pydicom's test files."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.conftest import LiveServer


@pytest.fixture()
def dicomweb(server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.base_url}/dicomweb")


@pytest.fixture()
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.base_url}/dicomweb/", timeout=60) as client:
        yield client


def dicom_port(server: LiveServer) -> int:
    """The DIMSE port the live server was started with."""
    return server.dicom_port


def ct_instance(
    study: str | None = None,
    series: str | None = None,
    number: int = 1,
    patient_id: str = "PAT-1",
    patient_name: str = "Doe^Jane",
    size: int = 64,
    modality: str = "CT",
    study_date: str = "20240102",
) -> Dataset:
    """A small synthetic CT image (16-bit, `size` x `size`)."""
    ds = Dataset()
    ds.preamble = b"\0" * 128  # a PS3.10 file, as STOW-RS requires
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-" + patient_id
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4096).tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart_body(parts: list[bytes], boundary: str = "kuroshio-test-boundary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    ) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def pydicom_test_files() -> list[Path]:
    """pydicom's and pydicom-data's test files (regular files only)."""
    from pydicom.data import get_testdata_files

    return sorted({Path(p) for p in get_testdata_files("**/*") if os.path.isfile(p)}, key=lambda p: p.name)
