"""Loaders: LOINC release folder, SNOMED CT RF2 snapshot and GPS, FHIR npm packages,
local code tables (CSV, XLSX), and the `kuroshio terminology load` command."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import DATABASE, ROOT, package_dir
from tests.terminology.conftest import FIXTURES, HOSPITAL, with_store
from tests.terminology.test_operations import out


def test_loinc_release_properties_designations_and_hierarchy(fhir, loaded):
    assert loaded["loinc"].concepts >= 322
    looked = fhir.get("CodeSystem/$lookup", params={"system": "http://loinc.org", "code": "11702-8", "property": "*"}).json()
    assert out(looked, "version") == ["2.79"]
    properties = {p["part"][0]["valueCode"]: p["part"][1] for p in looked["parameter"] if p["name"] == "property"}
    assert properties["COMPONENT"]["valueCoding"]["system"] == "http://loinc.org"
    assert properties["STATUS"]["valueString"] in ("ACTIVE", "TRIAL", "DISCOURAGED", "DEPRECATED")
    languages = {part["valueCode"] for p in looked["parameter"] if p["name"] == "designation" for part in p["part"] if part["name"] == "language"}
    assert {"zh-CN", "de-DE"} & languages
    chinese = fhir.get("CodeSystem/$lookup", params={"system": "http://loinc.org", "code": "11702-8", "displayLanguage": "zh-CN"}).json()
    assert "血流速度" in out(chinese, "display")[0]
    resource = fhir.get("CodeSystem/loinc").json()
    assert resource["content"] == "not-present" and resource["count"] == loaded["loinc"].concepts
    assert "Regenstrief" in resource["copyright"]
    filtered = fhir.get("ValueSet/$expand", params={"url": "http://loinc.org?fhir_vs", "filter": "blood product", "count": "5"}).json()
    assert filtered["expansion"]["total"] >= 1


def test_snomed_rf2_edition_display_and_is_a_closure(fhir, loaded):
    assert loaded["snomed"].concepts == 13
    looked = fhir.get("CodeSystem/$lookup", params={"system": "http://snomed.info/sct", "code": "73211009", "version": "http://snomed.info/sct/900000000000207008/version/20240101"}).json()
    assert out(looked, "display") == ["Diabetes mellitus"]
    assert out(looked, "version") == ["http://snomed.info/sct/900000000000207008/version/20240101"]
    uses = {part["valueCoding"]["code"] for p in looked["parameter"] if p["name"] == "designation" for part in p["part"] if part["name"] == "use" and part["valueCoding"]["system"] == "http://snomed.info/sct"}
    assert uses == {"900000000000003001", "900000000000013009"}
    subsumes = fhir.get("CodeSystem/$subsumes", params={"system": "http://snomed.info/sct", "version": "http://snomed.info/sct/900000000000207008/version/20240101", "codeA": "404684003", "codeB": "44054006"}).json()
    assert out(subsumes, "outcome") == ["subsumes"]
    below = fhir.get("ValueSet/$expand", params={"url": "http://snomed.info/sct?fhir_vs=isa/73211009"}).json()
    assert sorted(c["code"] for c in below["expansion"]["contains"]) == ["44054006", "46635009", "73211009"]
    inactive = fhir.get("CodeSystem/$validate-code", params={"url": "http://snomed.info/sct", "version": "http://snomed.info/sct/900000000000207008/version/20240101", "code": "190331003"}).json()
    assert out(inactive, "inactive") == [True]


def test_reloading_replaces_the_generation_without_leftovers(mongod, loaded, db):
    from terminology.loaders.snomed import load_rf2

    before = db.tx_concepts.count_documents({})
    with_store(mongod.uri, lambda store: load_rf2(store, FIXTURES / "rf2"))
    assert db.tx_concepts.count_documents({}) == before


def test_malformed_rf2_and_loinc_folders_are_refused(mongod, tmp_path):
    from terminology.loaders.loinc import LoincReleaseError, load_loinc
    from terminology.loaders.snomed import Rf2Error, load_rf2

    broken = tmp_path / "rf2" / "Snapshot" / "Terminology"
    shutil.copytree(FIXTURES / "rf2", tmp_path / "rf2", dirs_exist_ok=True)
    concept_file = next(broken.glob("sct2_Concept_Snapshot*"))
    concept_file.write_text("id\teffectiveTime\tactive\n1\t2024\t1\n")
    with pytest.raises(Rf2Error, match="definitionStatusId"):
        with_store(mongod.uri, lambda store: load_rf2(store, tmp_path / "rf2"))
    with pytest.raises(LoincReleaseError):
        with_store(mongod.uri, lambda store: load_loinc(store, tmp_path))


def test_gps_from_the_terminology_package(fhir, mongod):
    from terminology.loaders.snomed import load_gps

    result = with_store(mongod.uri, lambda store: load_gps(store, package_dir("hl7.terminology.r4")))
    assert result.concepts == 26158
    version = "http://snomed.info/sct/900000000000207008/version/20200731"
    checked = fhir.get("CodeSystem/$validate-code", params={"url": "http://snomed.info/sct", "version": version, "code": "109006"}).json()
    assert out(checked, "result") == [True]
    assert "Anxiety disorder of childhood" in out(checked, "display")[0]


def _mini_package(tmp_path: Path) -> Path:
    source = package_dir("hl7.terminology.r4")
    names = ["CodeSystem-v3-AdministrativeGender.json", "ValueSet-v3-AdministrativeGender.json", "package.json"]
    archive = tmp_path / "mini.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            data = (source / name).read_bytes()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_npm_package_tarball(fhir, mongod, tmp_path):
    from terminology.loaders.npm import load_package

    result = with_store(mongod.uri, lambda store: load_package(store, _mini_package(tmp_path)))
    assert result.resources == 2 and not result.skipped
    expanded = fhir.get("ValueSet/$expand", params={"url": "http://terminology.hl7.org/ValueSet/v3-AdministrativeGender"}).json()
    assert {"F", "M"} <= {c["code"] for c in expanded["expansion"]["contains"]}


def test_local_table_with_chinese_displays(fhir, loaded):
    assert loaded["hospital"].resources == 2
    translated = fhir.get("ConceptMap/$translate", params={"system": HOSPITAL, "code": "HBA1C", "targetsystem": "http://loinc.org"}).json()
    match = next(p for p in translated["parameter"] if p["name"] == "match")
    assert {"name": "concept", "valueCoding": {"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c/Hemoglobin.total in Blood"}} in match["part"]
    looked = fhir.get("CodeSystem/$lookup", params={"system": HOSPITAL, "code": "HGB"}).json()
    assert out(looked, "display") == ["血红蛋白"]
    unmatched = fhir.get("ConceptMap/$translate", params={"system": HOSPITAL, "code": "XTEST"}).json()
    assert out(unmatched, "result") == [False]


def test_local_table_xlsx_and_bad_tables(mongod, fhir, tmp_path):
    from openpyxl import Workbook

    from terminology.loaders.local import LocalTableError, load_local_table

    book = Workbook()
    sheet = book.active
    sheet.append(["Local Code", "Local Display", "Target System", "Target Code", "Equivalence"])
    sheet.append(["DX01", "二型糖尿病", "http://snomed.info/sct", "44054006", "equivalent"])
    path = tmp_path / "dx.xlsx"
    book.save(path)
    system = "http://hospital.example.org/fhir/CodeSystem/dx"
    with_store(mongod.uri, lambda store: load_local_table(store, path, system, "hospital-dx"))
    translated = fhir.get("ConceptMap/$translate", params={"system": system, "code": "DX01"}).json()
    assert out(translated, "result") == [True]

    bad = tmp_path / "bad.csv"
    bad.write_text("code,display\nX,Y\n", encoding="utf-8")
    with pytest.raises(LocalTableError, match="missing column"):
        with_store(mongod.uri, lambda store: load_local_table(store, bad, system, "bad"))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("local_code,local_display,target_system,target_code,equivalence\nX,Y,http://loinc.org,1-1,maybe\n", encoding="utf-8")
    with pytest.raises(LocalTableError, match="row 2"):
        with_store(mongod.uri, lambda store: load_local_table(store, wrong, system, "bad"))


def test_cli_load_local_and_errors(mongod, tmp_path):
    env = {**os.environ, "KUROSHIO_MONGODB_URI": mongod.uri, "KUROSHIO_MONGODB_DATABASE": DATABASE, "KUROSHIO_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "server.cli", "terminology", "load", "local"]
    ok = subprocess.run([*command, str(FIXTURES / "hospital-lab-codes.csv"), "--system", HOSPITAL, "--name", "hospital-lab", "--language", "zh-CN"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "2 resource(s), 25 concept(s) loaded" in ok.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("nothing,here\n", encoding="utf-8")
    refused = subprocess.run([*command, str(bad), "--system", HOSPITAL, "--name", "x"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "missing column" in refused.stderr
    assert "Traceback" not in refused.stderr
