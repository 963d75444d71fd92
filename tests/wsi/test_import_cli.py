"""`kuroshio wsi import`: a tiled TIFF converted with wsidicomizer, linked to the Patient and
specimen given, stored by STOW-RS; dciodvfy (dicom3tools) finds no error in what it
produces; unreadable slides and unreachable servers fail with a message, not a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pydicom
import pytest

from tests.conftest import ROOT
from tests.dicom.test_wado import parts
from tests.wsi import slides


def kuroshio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imported(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiff = slides.write_tiff(root / "slide.ome.tif", 700, 600)
    result = kuroshio("wsi", "import", str(tiff), "--patient-id", "CLI-PAT", "--specimen-id", "CLI-SPEC",
                      "--patient-name", "Doe^Jane", "--url", f"{server.base_url}/dicomweb", "--output", str(root / "out"))
    assert result.returncode == 0, result.stderr
    return result, sorted((root / "out").glob("*.dcm"))


def test_import_stores_the_pyramid_with_patient_and_specimen(http, imported):
    result, files = imported
    study = result.stdout.strip().splitlines()[-1]
    assert "stored" in result.stderr and "converting" in result.stderr
    kinds = sorted(slides.kind(f) for f in files)
    assert kinds == ["LABEL", "OVERVIEW", "VOLUME", "VOLUME", "VOLUME"]
    found = http.get(f"studies/{study}/instances").json()
    assert len(found) == len(files)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == study and ds.PatientID == "CLI-PAT" and str(ds.PatientName) == "Doe^Jane"
        assert ds.ContainerIdentifier == "CLI-SPEC"
        assert ds.SpecimenDescriptionSequence[0].SpecimenIdentifier == "CLI-SPEC"
    path = files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    url = f"studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    stored = parts(http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    assert stored == [path.read_bytes()]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is installed by scripts/test")
def test_dciodvfy_finds_no_error(imported):
    _, files = imported
    for path in files:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        output = report.stdout + report.stderr
        assert "VLWholeSlideMicroscopyImage" in output
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_unreadable_slide_and_unreachable_server(tmp_path, server):
    text = tmp_path / "notes.tif"
    text.write_text("not a slide")
    result = kuroshio("wsi", "import", str(text), "--patient-id", "P", "--specimen-id", "S",
                      "--url", f"{server.base_url}/dicomweb")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "notes.tif" in result.stderr
    tiff = slides.write_tiff(tmp_path / "slide.ome.tif", 300, 300)
    result = kuroshio("wsi", "import", str(tiff), "--patient-id", "P", "--specimen-id", "S",
                      "--url", "http://127.0.0.1:9/dicomweb")
    assert result.returncode == 1 and "Cannot store" in result.stderr and "Traceback" not in result.stderr
    assert kuroshio("wsi", "import", str(tiff), "--patient-id", "P").returncode == 2  # --specimen-id missing
