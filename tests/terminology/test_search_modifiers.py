"""Token search with the terminology engine, through real HTTP: `:in` and `:not-in` over
stored, literal and implicit value sets, `:below` and `:above` over the SNOMED CT
fixture edition's is-a hierarchy, search by the standard code finding resources recorded
under local codes, and the errors (unknown value set or code system, malformed value,
too large a value set)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from terminology.conceptmaps import NORMALIZE_TAG
from terminology.concepts import Concept
from tests.conftest import package_dir
from tests.fhir.helpers import FHIR_JSON, assert_outcome, created
from tests.terminology.conftest import with_store

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
BIG = "http://example.org/fhir/CodeSystem/ten-thousand-and-one"
TAG_SYSTEM = "urn:kuroshio:test:search-modifiers"


def coded(type_: str, system: str, code: str, tag: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": type_, "meta": {"tag": [{"system": TAG_SYSTEM, "code": tag}]},
        "code": {"coding": [{"system": system, "code": code}]},
    }
    if type_ == "Observation":
        resource["status"] = "final"
    else:
        resource["subject"] = {"reference": "Patient/search-modifiers"}
    return resource


@pytest.fixture(scope="module")
def data(server, loaded) -> dict[str, Any]:
    """Observations and Conditions under one fresh tag, and a ValueSet of two LOINC codes."""
    with httpx.Client(base_url=server.fhir + "/", timeout=60) as fhir:
        return _load(fhir)


def _load(fhir: httpx.Client) -> dict[str, Any]:
    tag = uuid.uuid4().hex
    # a normalization rule of this run: local "K" is LOINC 2823-3 (Potassium, Ser/Plas)
    local = f"http://hospital-{tag}.example.org/codes"
    created(fhir, "ConceptMap", {
        "resourceType": "ConceptMap", "meta": {"tag": [NORMALIZE_TAG]}, "url": f"{local}/map", "status": "active",
        "group": [{"source": local, "target": LOINC, "element": [
            {"code": "K", "target": [{"code": "2823-3", "equivalence": "equivalent"}]}]}],
    })
    ids: dict[str, str] = {}
    for name, type_, system, code in [
        ("potassium-local", "Observation", local, "K"),  # normalized: LOINC 2823-3 added
        ("potassium", "Observation", LOINC, "22760-3"),
        ("urine-potassium", "Observation", LOINC, "2828-2"),
        ("other", "Observation", "urn:example:codes", "X1"),
        ("diabetes", "Condition", SNOMED, "73211009"),
        ("type-1", "Condition", SNOMED, "46635009"),
        ("type-2", "Condition", SNOMED, "44054006"),
        ("hypertension", "Condition", SNOMED, "38341003"),
        ("disease", "Condition", SNOMED, "64572001"),
    ]:
        ids[created(fhir, type_, coded(type_, system, code, tag))["id"]] = name
    for gender in ("female", "male"):
        patient = {"resourceType": "Patient", "meta": {"tag": [{"system": TAG_SYSTEM, "code": tag}]}, "gender": gender}
        ids[created(fhir, "Patient", patient)["id"]] = gender
    for name in ("CodeSystem-administrative-gender.json", "ValueSet-administrative-gender.json"):  # R4's own
        definition = json.loads((package_dir("hl7.fhir.r4.examples") / name).read_text(encoding="utf-8"))
        response = fhir.put(f"{definition['resourceType']}/{definition['id']}", content=json.dumps(definition), headers=FHIR_JSON)
        assert response.status_code in (200, 201), response.text
    value_set = created(fhir, "ValueSet", {
        "resourceType": "ValueSet", "url": f"http://example.org/fhir/ValueSet/potassium-{tag}", "status": "active",
        "compose": {"include": [{"system": LOINC, "concept": [{"code": "2823-3"}, {"code": "22760-3"}]}]},
    })
    return {"tag": tag, "ids": ids, "value_set": value_set, "local": local}


def found(fhir, data: dict[str, Any], type_: str, **params: str) -> set[str]:
    response = fhir.get(type_, params={**params, "_tag": f"{TAG_SYSTEM}|{data['tag']}", "_count": "100"})
    assert response.status_code == 200, response.text
    return {data["ids"][e["resource"]["id"]] for e in response.json().get("entry", [])}


def test_in_and_not_in_a_stored_value_set(fhir, data):
    url = data["value_set"]["url"]
    assert found(fhir, data, "Observation", **{"code:in": url}) == {"potassium-local", "potassium"}
    assert found(fhir, data, "Observation", **{"code:not-in": url}) == {"urine-potassium", "other"}
    assert found(fhir, data, "Observation", **{"code:in": f"{url},http://snomed.info/sct?fhir_vs"}) == {"potassium-local", "potassium"}


def test_in_a_literal_reference_to_a_value_set(fhir, data):
    # search.html: a literal reference is read as one, else the value is a canonical URL
    relative = f"ValueSet/{data['value_set']['id']}"
    absolute = f"{str(fhir.base_url).rstrip('/')}/{relative}"
    for reference in (relative, absolute):
        assert found(fhir, data, "Observation", **{"code:in": reference}) == {"potassium-local", "potassium"}


def test_in_an_implicit_value_set(fhir, data):
    assert found(fhir, data, "Observation", **{"code:in": f"{LOINC}?fhir_vs"}) == {"potassium-local", "potassium", "urine-potassium"}
    assert found(fhir, data, "Condition", **{"code:in": f"{SNOMED}?fhir_vs=isa/73211009"}) == {"diabetes", "type-1", "type-2"}
    assert found(fhir, data, "Condition", **{"code:not-in": f"{SNOMED}?fhir_vs=isa/73211009"}) == {"hypertension", "disease"}


def test_in_on_a_code_element_whose_system_is_implicit(fhir, data):
    # Patient.gender is a `code`: its system comes from its binding, not from the data
    value_set = "http://hl7.org/fhir/ValueSet/administrative-gender"
    assert found(fhir, data, "Patient", **{"gender:in": value_set}) == {"female", "male"}
    female = "http://hl7.org/fhir/administrative-gender?fhir_vs=isa/female"
    assert found(fhir, data, "Patient", **{"gender:in": female}) == {"female"}
    assert found(fhir, data, "Patient", **{"gender:not-in": female}) == {"male"}


def test_in_takes_the_named_codes_of_a_fragment(fhir, loaded):
    """A value set naming codes of a code system the server holds only a fragment of (the
    SNOMED CT Global Patient Set, say) keeps the codes the fragment lacks; of a complete
    code system, a code it does not have is not a code, and is left out."""
    tag = uuid.uuid4().hex
    for content in ("fragment", "complete"):
        system = f"http://example.org/fhir/CodeSystem/{content}-{tag}"
        created(fhir, "CodeSystem", {"resourceType": "CodeSystem", "url": system, "status": "active",
                                     "content": content, "concept": [{"code": "A", "display": "A"}]})
        value_set = created(fhir, "ValueSet", {
            "resourceType": "ValueSet", "url": f"{system}/vs", "status": "active",
            "compose": {"include": [{"system": system, "concept": [{"code": "A"}, {"code": "B"}]}]},
        })
        ids = {created(fhir, "Observation", coded("Observation", system, code, tag))["id"]: code for code in "ABC"}
        data = {"tag": tag, "ids": ids}
        expected = {"A", "B"} if content == "fragment" else {"A"}
        assert found(fhir, data, "Observation", **{"code:in": value_set["url"], "code": f"{system}|"}) == expected


def test_below_and_above_follow_the_hierarchy(fhir, data):
    assert found(fhir, data, "Condition", **{"code:below": f"{SNOMED}|73211009"}) == {"diabetes", "type-1", "type-2"}
    assert found(fhir, data, "Condition", **{"code:below": f"{SNOMED}|64572001"}) == {
        "disease", "diabetes", "type-1", "type-2", "hypertension"}
    assert found(fhir, data, "Condition", **{"code:below": f"{SNOMED}|44054006"}) == {"type-2"}
    assert found(fhir, data, "Condition", **{"code:above": f"{SNOMED}|44054006"}) == {"type-2", "diabetes", "disease"}
    assert found(fhir, data, "Condition", **{"code:above": f"{SNOMED}|38341003"}) == {"hypertension", "disease"}
    # a code the edition does not know is still the same as itself
    assert found(fhir, data, "Condition", **{"code:below": f"{SNOMED}|999999999"}) == set()


def test_standard_code_finds_local_records(fhir, data):
    assert found(fhir, data, "Observation", code=f"{LOINC}|2823-3") == {"potassium-local"}
    assert found(fhir, data, "Observation", code=f"{data['local']}|K") == {"potassium-local"}


def test_capability_statement_claims_the_modifiers(fhir, data):
    statement = fhir.get("metadata").json()
    condition = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Condition")
    code = next(p for p in condition["searchParam"] if p["name"] == "code")
    assert {":in", ":not-in", ":above", ":below"} <= set(code["documentation"].removeprefix("Modifiers: ").split(", "))


@pytest.fixture(scope="module")
def big_code_system(mongod) -> str:
    """A code system of 10,001 concepts: one root with 10,000 children (search takes 10,000)."""
    from terminology.loaders.common import bulk_code_system

    header = {"resourceType": "CodeSystem", "id": "ten-thousand-and-one", "url": BIG, "status": "active",
              "content": "complete", "hierarchyMeaning": "is-a"}
    concepts = [Concept("R", "root"), *(Concept(f"C{n}", f"child {n}", parents=["R"], ancestors=["R"]) for n in range(10_000))]
    with_store(mongod.uri, lambda store: bulk_code_system(store, header, concepts, len(concepts)))
    return BIG


@pytest.mark.parametrize(("params", "code"), [
    ({"code:in": "http://example.org/fhir/ValueSet/no-such-value-set"}, "not-found"),
    ({"code:not-in": "ValueSet/no-such-id"}, "not-found"),
    ({"code:in": "http://unknown.example.org/codes?fhir_vs"}, "not-found"),
    ({"code:below": "http://unknown.example.org/codes|1"}, "not-found"),
    ({"code:above": "http://unknown.example.org/codes|1"}, "not-found"),
    ({"code:below": "73211009"}, "value"),
    ({"code:above": f"{SNOMED}|"}, "value"),
    ({"code:below": f"{SNOMED}|73211009|extra"}, "value"),
    ({"code:in": ""}, "value"),
    ({"code:in": '{"$gt": ""}'}, "not-found"),
])
def test_errors_are_operation_outcomes(fhir, loaded, params, code):
    body = assert_outcome(fhir.get("Condition", params=params), 400, code)
    assert list(params)[0] in str(body["issue"][0].get("expression", [])) + body["issue"][0].get("diagnostics", "")


def test_too_large_is_too_costly(fhir, big_code_system):
    assert_outcome(fhir.get("Condition", params={"code:in": f"{BIG}?fhir_vs"}), 400, "too-costly")
    assert_outcome(fhir.get("Condition", params={"code:below": f"{BIG}|R"}), 400, "too-costly")
    assert fhir.get("Condition", params={"code:below": f"{BIG}|C7"}).status_code == 200
