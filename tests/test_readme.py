"""The README's command examples work as written against a live server."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import start_server, stop_server

README = Path(__file__).resolve().parent.parent / "README.md"
TOOLS = ("curl ", "echoscu ", "storescu ", "findscu ")


def example_lines() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith(TOOLS)]


def test_readme_has_examples_for_each_interface():
    lines = example_lines()
    assert sum(line.startswith("curl ") and "/fhir" in line for line in lines) >= 14
    assert sum(line.startswith("curl ") and "/dicomweb" in line for line in lines) >= 4
    assert any(line.startswith("storescu ") for line in lines)


@pytest.fixture()
def fresh_server(mongod, tmp_path):
    """A server on its own database: the examples assume nothing else was stored."""
    live = start_server(mongod.uri, tmp_path / "server", {"KUROSHIO_MONGODB_DATABASE": "kuroshio_readme"})
    yield live
    stop_server(live)


def test_readme_examples_work_as_written(fresh_server, tmp_path):
    server = fresh_server
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "image.dcm")
    dicom_port = server.dicom_port
    for line in example_lines():
        command = line.replace("http://127.0.0.1:8080", server.base_url).replace(" 11112", f" {dicom_port}")
        args = shlex.split(command)
        if args[0] == "curl":
            args.insert(1, "--fail-with-body")
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
        if "$validate" in line:
            assert "Patient.birthDate" in result.stdout
        if "$translate" in line:
            assert "4548-4" in result.stdout
        if line.startswith("curl -s -X POST http://127.0.0.1:8080/fhir/Observation") and "HBA1C" in line:
            assert '"code":"4548-4"' in result.stdout
        if "/fhir/Patient?family=doe" in line:
            assert '"total":1' in result.stdout
        if "value-quantity=gt70000" in line or "_has:Observation" in line or "Patient/_search" in line:
            assert '"mode":"match"' in result.stdout
        if "_revinclude=Observation:subject" in line or "_include=Observation:subject" in line:
            assert '"resourceType":"Observation"' in result.stdout and '"resourceType":"Patient"' in result.stdout
        if "Observation?code=http://loinc.org|4548-4" in line or "Observation?code:in=" in line:
            assert '"code":"HBA1C"' in result.stdout
        if line.startswith("findscu"):
            assert "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322" in result.stdout + result.stderr
    assert (tmp_path / "image.jpg").read_bytes()[:2] == b"\xff\xd8"
