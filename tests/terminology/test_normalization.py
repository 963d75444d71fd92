"""Ingest normalization: mapped LOINC codings added next to local ones, re-applied after
a mapping changes, and the Synthea worked example (a copy of Synthea patients whose LOINC
lab codes are replaced by a fictitious hospital's local codes with Chinese displays is
found by every LOINC search exactly as the original data is)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
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


WORKED_EXAMPLE = "urn:kuroshio:worked-example"
# what differs between the two copies of a result: server ids, references, the code itself
SET_APART = ("id", "meta", "code", "subject", "encounter", "hasMember", "derivedFrom", "partOf", "basedOn")


def copy_of(bundle: dict, tag: str, localized: bool) -> dict:
    """The Synthea transaction with every resource tagged (to tell the copies apart) and,
    in the localized copy, LOINC lab codes replaced by the hospital's local codes."""
    bundle = copy.deepcopy(bundle)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        meta = resource.setdefault("meta", {})
        meta["tag"] = [*meta.get("tag", []), {"system": WORKED_EXAMPLE, "code": tag}]
        if localized and resource["resourceType"] == "Observation":
            localize(resource)
    return bundle


def results(response: dict) -> list[str]:
    """Each matched Observation as its patient's name and everything the copies share."""
    resources = [e["resource"] for e in response.get("entry", [])]
    names = {f"Patient/{r['id']}": json.dumps(r["name"], ensure_ascii=False) for r in resources if r["resourceType"] == "Patient"}
    return sorted(
        json.dumps([names[r["subject"]["reference"]], {k: v for k, v in r.items() if k not in SET_APART}], sort_keys=True)
        for r in resources if r["resourceType"] == "Observation"
    )


def test_synthea_worked_example(fhir, loaded, tmp_path: Path):
    """Synthea patients ingested twice: as generated, and as the fictitious hospital records
    them (local lab codes with Chinese displays). Every search by a LOINC code returns the
    same results, patient by patient, from both copies."""
    synthea = Path(sys.executable).parent / "synthea"
    done = subprocess.run([str(synthea), "-p", "2", "-s", "42", "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bundles = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((tmp_path / "fhir").glob("*.json"))]
    run = uuid.uuid4().hex[:12]
    root = str(fhir.base_url).rstrip("/")
    for bundle in bundles:
        for tag, localized in ((f"original-{run}", False), (f"localized-{run}", True)):
            response = fhir.post(root, content=json.dumps(copy_of(bundle, tag, localized)), headers=FHIR_JSON)
            assert response.status_code == 200, response.text[:1000]

    loinc_codes = sorted({
        c["code"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "Observation"
        for c in e["resource"]["code"]["coding"] if c["system"] == "http://loinc.org"
    })
    searches = [
        f"Observation?code=http://loinc.org|{code}&_tag={WORKED_EXAMPLE}|{copy_}-{run}&_include=Observation:subject&_count=1000"
        for code in loinc_codes for copy_ in ("original", "localized")
    ]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": u}} for u in searches]}
    response = fhir.post(root, content=json.dumps(batch), headers=FHIR_JSON)
    assert response.status_code == 200, response.text[:1000]
    answers = [e["resource"] for e in response.json()["entry"]]
    assert all(a["resourceType"] == "Bundle" and not any(link["relation"] == "next" for link in a["link"]) for a in answers)

    mapped = set(LOCAL_FOR_LOINC) & set(loinc_codes)
    assert len(mapped) >= 10, "the Synthea sample should carry lab results the hospital codes locally"
    for n, code in enumerate(loinc_codes):
        original, localized = answers[2 * n], answers[2 * n + 1]
        assert results(original), code
        assert results(localized) == results(original), code
        if code in mapped:  # found through the LOINC coding normalization added to the local one
            local_code, display = LOCAL_FOR_LOINC[code]
            for observation in (e["resource"] for e in localized["entry"] if e["resource"]["resourceType"] == "Observation"):
                first, added = observation["code"]["coding"]
                assert first == {"system": HOSPITAL, "code": local_code, "display": display}
                assert (added["system"], added["code"], added["userSelected"]) == ("http://loinc.org", code, False)
    # and the local code finds the localized copy only
    hemoglobin = len(results(answers[2 * loinc_codes.index("718-7")]))
    for copy_, expected in (("original", 0), ("localized", hemoglobin)):
        params = {"code": f"{HOSPITAL}|{LOCAL_FOR_LOINC['718-7'][0]}", "_tag": f"{WORKED_EXAMPLE}|{copy_}-{run}", "_summary": "count"}
        assert fhir.get("Observation", params=params).json()["total"] == expected, copy_


def test_malformed_codings_are_left_for_validation(fhir, loaded):
    """Normalization runs before validation: codings of the wrong JSON shape were a 500
    (TypeError) instead of validation's 400, and nothing is written."""
    for coding in (5, "x", [1, {"system": HOSPITAL, "code": "HBA1C"}], [{"system": HOSPITAL, "code": ["HBA1C"]}],
                   [{"system": {"a": 1}, "code": "HBA1C"}], [{"system": HOSPITAL, "code": "HBA1C", "extension": 7}]):
        resource = {"resourceType": "Observation", "id": f"bad-coding-{uuid.uuid4()}", "status": "final",
                    "code": {"coding": coding}}
        response = fhir.put(f"Observation/{resource['id']}", content=json.dumps(resource), headers=FHIR_JSON)
        assert response.status_code == 400, (coding, response.status_code, response.text[:200])
        assert response.json()["resourceType"] == "OperationOutcome"
        assert fhir.get(f"Observation/{resource['id']}").status_code == 404


def test_transaction_entries_are_normalized_together(fhir, loaded):
    """A transaction's resources are normalized with one lookup of all their local codes:
    each entry still gets exactly its own mapped codings, POST and PUT alike, and a
    matched ifNoneExist entry is not rewritten."""
    tag = f"tx-{uuid.uuid4()}"
    first = observation("HGB", "血红蛋白")
    two_codes = observation("WBC", "白细胞计数")
    two_codes["code"]["coding"].append({"system": HOSPITAL, "code": "RBC", "display": "红细胞计数"})
    repeated = observation("HGB", "血红蛋白")
    unmapped = observation("XTEST", "院内特殊检验")
    put = {**observation("HBA1C", "糖化血红蛋白"), "id": tag}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        *({"resource": r, "request": {"method": "POST", "url": "Observation"}} for r in (first, two_codes, repeated, unmapped)),
        {"resource": put, "request": {"method": "PUT", "url": f"Observation/{tag}"}},
    ]}
    response = fhir.post("", content=json.dumps(bundle), headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    stored = [fhir.get(e["response"]["location"].split("/_history")[0]).json() for e in response.json()["entry"]]
    assert [[c["code"] for c in standard(s)] for s in stored] == [["718-7"], ["6690-2", "789-8"], ["718-7"], [], ["4548-4"]]
    assert all(c["userSelected"] is False for s in stored for c in standard(s))


def test_normalization_rows_are_looked_up_in_chunks(mongod, loaded, monkeypatch):
    """More local codes than one query takes are looked up in several, and all are found
    (XTEST is in the hospital's table without a target)."""
    from server.store import terminology as tstore_module
    from server.store.terminology import TerminologyStore

    monkeypatch.setattr(tstore_module, "QUERY_CODES", 2)
    codes = {HOSPITAL: {"HGB", "HBA1C", "WBC", "RBC", "XTEST"}, "http://elsewhere.example.org": {"HGB"}}

    async def lookup(store):
        return await TerminologyStore(store).normalization_rows(codes)

    rows = with_store(mongod.uri, lookup)
    assert sorted((r["sc"], r["tc"]) for r in rows if r["ss"] == HOSPITAL) == [
        ("HBA1C", "4548-4"), ("HGB", "718-7"), ("RBC", "789-8"), ("WBC", "6690-2"), ("XTEST", None)]
    assert all(r["ss"] == HOSPITAL and r["n"] is True for r in rows)
