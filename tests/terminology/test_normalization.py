"""Ingest normalization: mapped LOINC codings added next to local ones, re-applied after
a mapping changes, and the Synthea worked example (LOINC lab codes replaced by a
fictitious hospital's local codes with Chinese displays come back as LOINC)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fhir.helpers import FHIR_JSON
from tests.terminology.conftest import FIXTURES, HOSPITAL, with_store

MAPPED_BY = "https://kuroshio.dev/fhir/StructureDefinition/mapped-by"


def observation(code: str, display: str) -> dict:
    return {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": HOSPITAL, "code": code, "display": display}], "text": display},
        "valueQuantity": {"value": 6.1, "unit": "%"},
    }


def standard(resource: dict, system: str = "http://loinc.org") -> list[dict]:
    return [c for c in resource["code"]["coding"] if c.get("system") == system]


def test_mapped_coding_is_added_and_marked(fhir, loaded):
    created = fhir.post("Observation", content=json.dumps(observation("HBA1C", "糖化血红蛋白")), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    stored = fhir.get(f"Observation/{created.json()['id']}").json()
    local, added = stored["code"]["coding"]
    assert local == {"system": HOSPITAL, "code": "HBA1C", "display": "糖化血红蛋白"}
    assert added["code"] == "4548-4" and added["userSelected"] is False
    assert added["extension"][0]["url"] == MAPPED_BY
    assert added["extension"][0]["valueCanonical"].startswith(HOSPITAL)


def test_unmapped_and_standard_codes_are_left_alone(fhir, loaded):
    unmapped = fhir.post("Observation", content=json.dumps(observation("XTEST", "院内特殊检验")), headers=FHIR_JSON).json()
    assert len(unmapped["code"]["coding"]) == 1
    loinc = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}}
    kept = fhir.post("Observation", content=json.dumps(loinc), headers=FHIR_JSON).json()
    assert kept["code"]["coding"] == [{"system": "http://loinc.org", "code": "718-7"}]


def test_only_tagged_concept_maps_normalize(fhir, loaded):
    system = "http://other-hospital.example.org/codes"
    untagged = {"resourceType": "ConceptMap", "url": f"{system}-map", "status": "active", "group": [
        {"source": system, "target": "http://loinc.org", "element": [{"code": "K", "target": [{"code": "2823-3", "equivalence": "equivalent"}]}]}]}
    created = fhir.post("ConceptMap", content=json.dumps(untagged), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    local = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": system, "code": "K"}]}}
    assert len(fhir.post("Observation", content=json.dumps(local), headers=FHIR_JSON).json()["code"]["coding"]) == 1
    tag = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [
        {"system": "https://kuroshio.dev/fhir/CodeSystem/terminology", "code": "normalize-at-ingest"}]}}]}
    assert fhir.post(f"ConceptMap/{created.json()['id']}/$meta-add", content=json.dumps(tag), headers=FHIR_JSON).status_code == 200
    normalized = fhir.post("Observation", content=json.dumps(local), headers=FHIR_JSON).json()
    assert [c["code"] for c in normalized["code"]["coding"]] == ["K", "2823-3"]


def test_changed_mapping_is_reapplied_to_stored_data(fhir, mongod, loaded):
    from terminology.normalization import reapply

    created = fhir.post("Observation", content=json.dumps(observation("HGB", "血红蛋白")), headers=FHIR_JSON).json()
    assert [c["code"] for c in standard(created)] == ["718-7"]
    concept_map = fhir.get("ConceptMap/hospital-lab-map").json()
    for element in concept_map["group"][0]["element"]:
        if element["code"] == "HGB":
            element["target"] = [{"code": "30313-1", "equivalence": "equivalent"}]
    assert fhir.put("ConceptMap/hospital-lab-map", content=json.dumps(concept_map), headers=FHIR_JSON).status_code == 200
    changed = with_store(mongod.uri, lambda store: reapply(store, ("Observation",)))
    assert changed >= 1
    after = fhir.get(f"Observation/{created['id']}").json()
    assert [c["code"] for c in standard(after)] == ["30313-1"]
    assert after["meta"]["versionId"] == "2"
    assert with_store(mongod.uri, lambda store: reapply(store, ("Observation",))) == 0
    for element in concept_map["group"][0]["element"]:
        if element["code"] == "HGB":
            element["target"] = [{"code": "718-7", "equivalence": "equivalent"}]
    assert fhir.put("ConceptMap/hospital-lab-map", content=json.dumps(concept_map), headers=FHIR_JSON).status_code == 200


LOCAL_FOR_LOINC = {
    row.split(",")[3]: (row.split(",")[0], row.split(",")[1])
    for row in (FIXTURES / "hospital-lab-codes.csv").read_text(encoding="utf-8").splitlines()[1:]
    if row.split(",")[3]
}


def localize(resource: dict) -> bool:
    """Replace LOINC lab codes by the hospital's local codes (as the hospital records them)."""
    coding = resource.get("code", {}).get("coding", [])
    local = [LOCAL_FOR_LOINC[c["code"]] for c in coding if c.get("system") == "http://loinc.org" and c.get("code") in LOCAL_FOR_LOINC]
    if not local:
        return False
    code, display = local[0]
    resource["code"] = {"coding": [{"system": HOSPITAL, "code": code, "display": display}], "text": display}
    return True


def test_synthea_worked_example(fhir, loaded, tmp_path: Path):
    synthea = Path(sys.executable).parent / "synthea"
    done = subprocess.run([str(synthea), "-p", "2", "-s", "42", "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    originals: dict[str, str] = {}
    for bundle_path in sorted((tmp_path / "fhir").glob("*.json")):
        bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] != "Observation":
                continue
            loinc = [c["code"] for c in resource["code"]["coding"] if c["system"] == "http://loinc.org"]
            body = {k: v for k, v in resource.items() if k not in ("id", "subject", "encounter", "hasMember", "derivedFrom")}
            if not localize(body):
                continue
            created = fhir.post("Observation", content=json.dumps(body), headers=FHIR_JSON)
            assert created.status_code == 201, created.text
            originals[created.json()["id"]] = loinc[0]
    assert len(originals) >= 10, "the Synthea sample should carry lab results"
    for id_, loinc_code in originals.items():
        stored = fhir.get(f"Observation/{id_}").json()
        assert stored["code"]["coding"][0]["system"] == HOSPITAL
        assert [c["code"] for c in standard(stored)] == [loinc_code]
