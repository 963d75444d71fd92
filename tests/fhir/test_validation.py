"""Validation of incoming resources to the letter of R4 (server/fhir/validation.py,
r4validator.py, primitives.py): each kind of problem, directly and over HTTP against the
live server, with the FHIRPath expression each OperationOutcome issue must carry; the
R4-valid forms that must pass; and the R4B-unsuitable set, recomputed from the models.
"""

from __future__ import annotations

import importlib
import json
import types
import typing
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class

from server.fhir import jsonio
from server.fhir.definitions import resource_types
from server.fhir.outcome import FhirError
from server.fhir.r4validator import validate as r4_validate
from server.fhir.structure import table
from server.fhir.validation import R4B_UNSUITABLE, fhir_resources_issues, fhirpath, validate
from tests.conftest import LiveServer, package_dir
from tests.fhir.helpers import FHIR_JSON

XHTML = '<div xmlns="http://www.w3.org/1999/xhtml">{}</div>'
OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
EXTENSION_STRING = {"url": "http://example.org/x", "valueString": "a"}


def observation(**elements: Any) -> dict[str, Any]:
    return {**OBSERVATION, **elements}


CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


def condition(**elements: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": "Patient/1"}, **elements}


def risk_estimate(unit: dict[str, Any]) -> dict[str, Any]:
    """An R4 RiskEvidenceSynthesis whose estimate's unit is `unit` (bound to all of UCUM)."""
    return {"resourceType": "RiskEvidenceSynthesis", "status": "draft", "population": {"reference": "EvidenceVariable/1"},
            "outcome": {"reference": "EvidenceVariable/2"},
            "riskEstimate": {"value": 0.2, "unitOfMeasure": unit}}


def concept(*codings: tuple[str | None, str], **elements: Any) -> dict[str, Any]:
    """A CodeableConcept of (system, code) codings (system None: left out)."""
    coding = [{"code": code} if system is None else {"system": system, "code": code} for system, code in codings]
    return {"coding": coding, **elements} if coding else dict(elements)


# (case id, resource, the expression an issue must name, its issue code)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # structure: unknown elements, also those only R4B (fhir.resources) knows
    ("unknown element", {"resourceType": "Patient", "foo": 1}, "Patient.foo", "structure"),
    ("unknown nested element", {"resourceType": "Patient", "name": [{"family": "x", "foo": 1}]}, "Patient.name[0].foo", "structure"),
    ("fhir_comments (DSTU2)", {"resourceType": "Patient", "fhir_comments": ["x"]}, "Patient.fhir_comments", "structure"),
    ("R4B-only extension type", {"resourceType": "Patient", "extension": [{"url": "http://x", "valueRatioRange": {"denominator": {"value": 1}}}]},
     "Patient.extension[0].valueRatioRange", "structure"),
    ("R4B-only element", {"resourceType": "ActivityDefinition", "status": "draft", "subjectCanonical": "http://x"},
     "ActivityDefinition.subjectCanonical", "structure"),
    ("_ on a complex element", {"resourceType": "Patient", "_name": [{"id": "a"}]}, "Patient._name", "structure"),
    ("resourceType in a datatype", {"resourceType": "Patient", "name": [{"resourceType": "HumanName", "family": "x"}]},
     "Patient.name[0].resourceType", "structure"),
    # JSON shapes of cardinality
    ("array for a single element", {"resourceType": "Patient", "gender": ["male"]}, "Patient.gender", "structure"),
    ("object for a repeating element", {"resourceType": "Patient", "name": {"family": "x"}}, "Patient.name", "structure"),
    ("empty array", {"resourceType": "Patient", "name": []}, "Patient.name", "structure"),
    ("empty object", {"resourceType": "Patient", "name": [{}]}, "Patient.name[0]", "required"),
    ("object with only id", {"resourceType": "Patient", "maritalStatus": {"id": "a"}}, "Patient.maritalStatus", "required"),
    ("null", {"resourceType": "Patient", "gender": None}, "Patient.gender", "value"),
    ("string for an object", {"resourceType": "Patient", "maritalStatus": "married"}, "Patient.maritalStatus", "structure"),
    # required elements
    ("required element", {"resourceType": "Observation", "code": {"text": "x"}}, "Observation.status", "required"),
    ("required in a backbone", {"resourceType": "Patient", "link": [{"type": "seealso"}]}, "Patient.link[0].other", "required"),
    ("required in a datatype", {"resourceType": "Patient", "extension": [{"valueString": "a"}]}, "Patient.extension[0].url", "required"),
    ("required choice", {"resourceType": "Patient", "multipleBirthBoolean": True, "link": [{"other": {"reference": "Patient/1"}}]},
     "Patient.link[0].type", "required"),
    ("required in contentReference", {"resourceType": "Questionnaire", "status": "draft", "item": [{"linkId": "1", "type": "group", "item": [{"type": "string"}]}]},
     "Questionnaire.item[0].item[0].linkId", "required"),
    ("R4-only required element", {"resourceType": "Evidence", "status": "draft"}, "Evidence.exposureBackground", "required"),
    # choice types
    ("two choice types", observation(valueString="a", valueBoolean=True), "Observation.value", "structure"),
    ("choice value and other type's extension", observation(valueString="a", _valueBoolean={"extension": [EXTENSION_STRING]}),
     "Observation.value", "structure"),
    ("unknown choice type", observation(valueMoney={"value": 1}), "Observation.valueMoney", "structure"),
    # primitive datatypes: JSON form and R4 grammar
    ("boolean as a string", {"resourceType": "Patient", "active": "true"}, "Patient.active", "value"),
    ("integer with a fraction", {"resourceType": "Patient", "multipleBirthInteger": Decimal("2.0")},
     "Patient.multipleBirth.ofType(integer)", "value"),
    ("integer as a string", {"resourceType": "Patient", "multipleBirthInteger": "2"}, "Patient.multipleBirth.ofType(integer)", "value"),
    ("integer beyond 32 bits", {"resourceType": "Patient", "multipleBirthInteger": 2**31}, "Patient.multipleBirth.ofType(integer)", "value"),
    ("negative unsignedInt", {"resourceType": "Patient", "photo": [{"size": -1}]}, "Patient.photo[0].size", "value"),
    ("zero positiveInt", observation(valueSampledData={"origin": {"value": 0}, "period": 1, "dimensions": 0}),
     "Observation.value.ofType(SampledData).dimensions", "value"),
    ("decimal as a string", observation(valueQuantity={"value": "1.5"}), "Observation.value.ofType(Quantity).value", "value"),
    ("date out of grammar", {"resourceType": "Patient", "birthDate": "2020-13-01"}, "Patient.birthDate", "value"),
    ("date that does not exist", {"resourceType": "Patient", "birthDate": "2021-02-29"}, "Patient.birthDate", "value"),
    ("date with a time", {"resourceType": "Patient", "birthDate": "2020-01-01T00:00:00Z"}, "Patient.birthDate", "value"),
    ("dateTime without zone", observation(effectiveDateTime="2020-01-01T10:00:00"), "Observation.effective.ofType(dateTime)", "value"),
    ("instant without time", observation(issued="2020-01-01"), "Observation.issued", "value"),
    ("time of 24 hours", observation(valueTime="24:00:00"), "Observation.value.ofType(time)", "value"),
    ("id too long", {"resourceType": "Patient", "contained": [{"resourceType": "Basic", "id": "a" * 65, "code": {"text": "x"}}]},
     "Patient.contained[0].id", "value"),
    ("uri with a space", {"resourceType": "Patient", "implicitRules": "http://a b"}, "Patient.implicitRules", "value"),
    ("code with leading space", {"resourceType": "Patient", "gender": " male"}, "Patient.gender", "value"),
    ("code outside its required binding", {"resourceType": "Patient", "gender": "x"}, "Patient.gender", "value"),
    ("bound code in a datatype", {"resourceType": "Patient", "name": [{"use": "alias", "family": "a"}]},
     "Patient.name[0].use", "value"),
    ("bound code in a backbone element", {"resourceType": "Patient", "link": [{"other": {"reference": "Patient/1"}, "type": "see-also"}]},
     "Patient.link[0].type", "value"),
    ("bound code in a contentReference", {"resourceType": "Questionnaire", "status": "draft",
                                          "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "2", "type": "text-area"}]}]},
     "Questionnaire.item[0].item[0].type", "value"),
    ("bound code in an array", {"resourceType": "CapabilityStatement", "status": "draft", "date": "2020", "kind": "instance",
                                "fhirVersion": "4.0.1", "format": ["json"], "patchFormat": ["application/json-patch+json"],
                                "implementation": {"description": "x"}, "rest": [{"mode": "server",
                                "resource": [{"type": "Patient", "interaction": [{"code": "read"}, {"code": "search"}]}]}]},
     "CapabilityStatement.rest[0].resource[0].interaction[1].code", "value"),
    # required bindings of CodeableConcept elements: some coding must be from the value set
    ("CodeableConcept code outside its required binding", condition(clinicalStatus=concept((CLINICAL, "bogus"))),
     "Condition.clinicalStatus", "value"),
    ("CodeableConcept with only text on a required binding", condition(clinicalStatus=concept(text="active")),
     "Condition.clinicalStatus", "value"),
    ("CodeableConcept with only another system's coding", condition(clinicalStatus=concept((SNOMED, "55561003"), text="Active")),
     "Condition.clinicalStatus", "value"),
    ("CodeableConcept coding without a system", condition(verificationStatus=concept((None, "confirmed"))),
     "Condition.verificationStatus", "value"),
    ("CodeableConcept code of another value set's system", condition(clinicalStatus=concept((VER_STATUS, "confirmed"))),
     "Condition.clinicalStatus", "value"),
    ("CodeableConcept code in the wrong case", {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/1"},
     "verificationStatus": concept(("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "Confirmed"))},
     "AllergyIntolerance.verificationStatus", "value"),
    ("bound CodeableConcept in a backbone element", {"resourceType": "InsurancePlan", "plan": [{"specificCost": [{
        "category": {"text": "x"}, "benefit": [{"type": {"text": "x"}, "cost": [{"type": {"text": "x"},
        "applicability": concept(("http://terminology.hl7.org/CodeSystem/applicability", "maybe"))}]}]}]}]},
     "InsurancePlan.plan[0].specificCost[0].benefit[0].cost[0].applicability", "value"),
    ("bound CodeableConcept in a contained resource", {"resourceType": "Patient", "contained": [
        condition(id="c", clinicalStatus=concept((CLINICAL, "bogus")))]}, "Patient.contained[0].clinicalStatus", "value"),
    ("bound CodeableConcept in a Bundle entry", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": condition(verificationStatus=concept(text="confirmed"))}]}, "Bundle.entry[0].resource.verificationStatus", "value"),
    ("unit outside UCUM on a ucum-units binding", risk_estimate(concept((UCUM, "mg/dL/"))),
     "RiskEvidenceSynthesis.riskEstimate.unitOfMeasure", "value"),
    ("unit of another system on a ucum-units binding", risk_estimate(concept(("http://example.org/units", "mg/dL"))),
     "RiskEvidenceSynthesis.riskEstimate.unitOfMeasure", "value"),
    ("empty string", {"resourceType": "Patient", "name": [{"family": ""}]}, "Patient.name[0].family", "value"),
    ("string over 1 MiB", {"resourceType": "Patient", "name": [{"family": "a" * (1024 * 1024 + 1)}]}, "Patient.name[0].family", "value"),
    ("string with a form feed", {"resourceType": "Patient", "name": [{"family": "a\fb"}]}, "Patient.name[0].family", "value"),
    ("base64 out of grammar", {"resourceType": "Patient", "photo": [{"data": "!!!!"}]}, "Patient.photo[0].data", "value"),
    ("base64 not in groups of 4", {"resourceType": "Patient", "photo": [{"data": "QUJ DRA="}]}, "Patient.photo[0].data", "value"),
    ("oid out of grammar", {"resourceType": "Patient", "extension": [{"url": "http://x", "valueOid": "1.2.3"}]},
     "Patient.extension[0].value.ofType(oid)", "value"),
    ("uuid without urn", {"resourceType": "Patient", "extension": [{"url": "http://x", "valueUuid": "53fefa32-fcbb-4ff8-8a92-55ee120877b7"}]},
     "Patient.extension[0].value.ofType(uuid)", "value"),
    ("number for a string", {"resourceType": "Patient", "name": [{"family": 7}]}, "Patient.name[0].family", "value"),
    ("literal reference grammar", {"resourceType": "Patient", "managingOrganization": {"reference": "not a reference"}},
     "Patient.managingOrganization.reference", "value"),
    # primitive extensions
    ("_given not aligned", {"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [None]}]}, "Patient.name[0].given", "structure"),
    ("null value without extension", {"resourceType": "Patient", "name": [{"given": ["a", None]}]}, "Patient.name[0].given[1]", "structure"),
    ("null in both arrays", {"resourceType": "Patient", "name": [{"given": ["a", None], "_given": [None, None]}]},
     "Patient.name[0].given[1]", "structure"),
    ("_ without value or extension", {"resourceType": "Patient", "_birthDate": {"id": "a"}}, "Patient.birthDate", "required"),
    ("_ as an array for a single element", {"resourceType": "Patient", "_birthDate": [{"extension": [EXTENSION_STRING]}]},
     "Patient.birthDate", "structure"),
    ("bad extension in _", {"resourceType": "Patient", "birthDate": "2000", "_birthDate": {"extension": [{"valueString": "a"}]}},
     "Patient.birthDate.extension[0].url", "required"),
    # narrative
    ("xhtml not XML", {"resourceType": "Patient", "text": {"status": "generated", "div": "<div>unclosed"}}, "Patient.text.div", "value"),
    ("xhtml outside the namespace", {"resourceType": "Patient", "text": {"status": "generated", "div": "<div>text</div>"}},
     "Patient.text.div", "value"),
    ("xhtml with a script", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format("<script>x()</script>")}},
     "Patient.text.div", "value"),
    ("xhtml with an event attribute", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format('<p onclick="x()">a</p>')}},
     "Patient.text.div", "value"),
    ("xhtml empty", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format(" ")}}, "Patient.text.div", "value"),
    ("xhtml with extensions", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format("x"), "_div": {"id": "a"}}},
     "Patient.text.div", "structure"),
    # nested resources, validated by their own type
    ("contained resource", {"resourceType": "Patient", "contained": [{"resourceType": "Basic", "id": "b"}]}, "Patient.contained[0].code", "required"),
    ("contained unknown type", {"resourceType": "Patient", "contained": [{"resourceType": "Nope", "id": "b"}]}, "Patient.contained[0]", "value"),
    ("contained without resourceType", {"resourceType": "Patient", "contained": [{"id": "b"}]}, "Patient.contained[0]", "required"),
    ("contained R4-only type", {"resourceType": "Patient", "contained": [{"resourceType": "MedicinalProduct", "id": "m", "name": [{"productName": 1}]}]},
     "Patient.contained[0].name[0].productName", "value"),
    ("bundle entry resource", {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "active": 1}}]},
     "Bundle.entry[0].resource.active", "value"),
    ("parameters resource", {"resourceType": "Parameters", "parameter": [{"name": "p", "resource": {"resourceType": "Patient", "gender": 1}}]},
     "Parameters.parameter[0].resource.gender", "value"),
    ("bundle entry outcome", {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "200", "outcome": {"resourceType": "OperationOutcome"}}}]},
     "Bundle.entry[0].response.outcome.issue", "required"),
]

# R4-valid forms, several of which fhir.resources (R4B) rejects or R4B does not define.
VALID: list[tuple[str, dict[str, Any]]] = [
    ("primitive extension aligned", {"resourceType": "Patient", "name": [{"given": ["a", None], "_given": [None, {"extension": [EXTENSION_STRING]}]}]}),
    ("extension instead of a value", {"resourceType": "Patient", "_gender": {"extension": [EXTENSION_STRING]}}),
    ("_value on an extension", {"resourceType": "Patient", "extension": [{**EXTENSION_STRING, "_valueString": {"extension": [EXTENSION_STRING]}}]}),
    ("extension valueMeta", {"resourceType": "Patient", "extension": [{"url": "http://x", "valueMeta": {"versionId": "1"}}]}),
    ("uuid of version 1", {"resourceType": "Patient", "extension": [{"url": "http://x", "valueUuid": "urn:uuid:a5f0e1c2-1d2b-11ee-be56-0242ac120002"}]}),
    ("code with a no-break space", {"resourceType": "Patient", "language": "\u00a0"}),  # unbound: grammar only
    ("string with an ideographic space", {"resourceType": "Patient", "name": [{"text": "山田\u3000太郎"}]}),
    ("leap second", observation(effectiveDateTime="2016-12-31T23:59:60Z")),
    ("partial dates", {"resourceType": "Patient", "birthDate": "1970", "deceasedDateTime": "2020-02"}),
    ("decimal precision and exponent", observation(valueQuantity={"value": Decimal("1.50")}, referenceRange=[{"low": {"value": Decimal("1E-22")}}])),
    ("integer as a decimal", observation(valueQuantity={"value": 5})),
    ("base64 with line breaks", {"resourceType": "Binary", "contentType": "text/plain", "data": "QUJD\nREVG\n"}),
    ("xhtml narrative", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format('<p class="x">Hi <b>there</b></p>')}}),
    ("xhtml only an image", {"resourceType": "Patient", "text": {"status": "generated", "div": XHTML.format('<img src="#a" alt=""/>')}}),
    ("contained and references", {"resourceType": "Patient", "contained": [{"resourceType": "Organization", "id": "o", "name": "x"}],
                                  "managingOrganization": {"reference": "#o"}, "generalPractitioner": [{"reference": "urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7"}]}),
    ("R4-only type", {"resourceType": "MedicinalProduct", "name": [{"productName": "x"}]}),
    ("R4-only type contained", {"resourceType": "Patient", "contained": [{"resourceType": "MedicinalProduct", "id": "m", "name": [{"productName": "x"}]}]}),
    ("redefined type in a Bundle", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Evidence", "status": "draft", "exposureBackground": {"reference": "EvidenceVariable/1"}}}]}),
    ("R4 Evidence", {"resourceType": "Evidence", "status": "draft", "exposureBackground": {"reference": "EvidenceVariable/1"}}),
    # required bindings of CodeableConcept elements: one coding from the value set suffices
    ("required CodeableConcept with an unrelated coding", condition(
        clinicalStatus=concept((SNOMED, "55561003"), (CLINICAL, "active"), text="Active"),
        verificationStatus=concept((VER_STATUS, "confirmed"), ("http://example.org/local", "C")))),
    ("required CodeableConcept with a nested concept", condition(clinicalStatus={
        "coding": [{"system": CLINICAL, "version": "4.0.1", "code": "relapse", "display": "Relapse", "userSelected": True}]})),
    ("required CodeableConcept absent", condition(code=concept((SNOMED, "44054006")))),
    ("UCUM units on a ucum-units binding", risk_estimate(concept((UCUM, "mg/dL"), ("http://example.org/units", "x")))),
    ("UCUM annotation on a ucum-units binding", risk_estimate(concept((UCUM, "{events}/(100.a)")))),
]


def test_resource_types_cover_r4() -> None:
    assert len(resource_types()) == 146


@pytest.mark.parametrize(("resource", "expression", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_directly(resource: dict[str, Any], expression: str, code: str) -> None:
    with pytest.raises(FhirError) as raised:
        validate(resource)
    assert raised.value.status == 400
    found = {e: i.code for i in raised.value.issues for e in i.expression}
    assert found.get(expression) == code, found


@pytest.mark.parametrize("resource", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_directly(resource: dict[str, Any]) -> None:
    validate(resource)


def test_required_binding_issue_names_the_value_set() -> None:
    issues = r4_validate(condition(clinicalStatus=concept((CLINICAL, "bogus")))).issues
    assert [(i.code, i.expression) for i in issues] == [("value", ("Condition.clinicalStatus",))]
    message = issues[0].diagnostics
    assert "http://hl7.org/fhir/ValueSet/condition-clinical" in message, message
    assert "bogus" in message and "resolved" in message, message
    text_only = r4_validate(condition(verificationStatus=concept(text="confirmed"))).issues
    assert "http://hl7.org/fhir/ValueSet/condition-ver-status" in text_only[0].diagnostics
    assert "no coding" in text_only[0].diagnostics


def test_structure_problems_of_a_bound_concept_are_not_repeated_as_binding_problems() -> None:
    issues = r4_validate(condition(clinicalStatus={"coding": [{"system": CLINICAL, "code": "active", "foo": 1}]})).issues
    assert [i.expression for i in issues] == [("Condition.clinicalStatus.coding[0].foo",)]
    issues = r4_validate(condition(clinicalStatus={"coding": {"system": CLINICAL, "code": "active"}})).issues
    assert [i.expression for i in issues] == [("Condition.clinicalStatus.coding",)]


def test_required_binding_of_a_coding() -> None:
    """R4's own definitions bind no element of type Coding with strength required (the
    table test below checks it), but profiles do: the rule for a Coding is that of one
    coding of a CodeableConcept, with no alternative."""
    from server.fhir.r4validator import Binding

    binding = Binding("http://example.org/ValueSet/v", {"http://example.org/s": frozenset({"a", "b"})}, concept=False)
    assert binding.problem({"system": "http://example.org/s", "code": "a"}) is None
    for coding in ({"system": "http://example.org/s", "code": "c"}, {"code": "a"},
                   {"system": "http://example.org/other", "code": "a"}, {"system": "http://example.org/s", "display": "A"}):
        problem = binding.problem(coding)
        assert problem is not None and "http://example.org/ValueSet/v" in problem, coding


def test_checked_coded_bindings_are_the_enumerable_ones() -> None:
    """The required bindings of R4's Coding and CodeableConcept elements: all of type
    CodeableConcept; checked where the value set can be enumerated from the definitions."""
    checked = {path: value_set for entry in table().values() for path, (value_set, _codes) in entry.get("coded", {}).items()}
    assert checked == {
        "AdverseEvent.severity": "http://hl7.org/fhir/ValueSet/adverse-event-severity",
        "AdverseEvent.outcome": "http://hl7.org/fhir/ValueSet/adverse-event-outcome",
        "AllergyIntolerance.clinicalStatus": "http://hl7.org/fhir/ValueSet/allergyintolerance-clinical",
        "AllergyIntolerance.verificationStatus": "http://hl7.org/fhir/ValueSet/allergyintolerance-verification",
        "Condition.clinicalStatus": "http://hl7.org/fhir/ValueSet/condition-clinical",
        "Condition.verificationStatus": "http://hl7.org/fhir/ValueSet/condition-ver-status",
        "InsurancePlan.plan.specificCost.benefit.cost.applicability": "http://hl7.org/fhir/ValueSet/insuranceplan-applicability",
        "Measure.improvementNotation": "http://hl7.org/fhir/ValueSet/measure-improvement-notation",
        "MeasureReport.improvementNotation": "http://hl7.org/fhir/ValueSet/measure-improvement-notation",
        "SupplyDelivery.type": "http://hl7.org/fhir/ValueSet/supplydelivery-type",
        "EffectEvidenceSynthesis.effectEstimate.unitOfMeasure": "http://hl7.org/fhir/ValueSet/ucum-units",
        "ResearchElementDefinition.characteristic.unitOfMeasure": "http://hl7.org/fhir/ValueSet/ucum-units",
        "RiskEvidenceSynthesis.riskEstimate.unitOfMeasure": "http://hl7.org/fhir/ValueSet/ucum-units",
    }
    assert table()["RiskEvidenceSynthesis"]["coded"]["RiskEvidenceSynthesis.riskEstimate.unitOfMeasure"][1] == {UCUM: None}
    condition_clinical = table()["Condition"]["coded"]["Condition.clinicalStatus"][1]
    assert condition_clinical == {CLINICAL: ["active", "inactive", "recurrence", "relapse", "remission", "resolved"]}


def test_unchecked_coded_bindings_are_those_the_definitions_cannot_enumerate() -> None:
    """What the documents say is left unchecked, from the StructureDefinitions themselves."""
    definitions = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(package_dir("hl7.fhir.r4.examples").glob("StructureDefinition-*.json"))
    ]
    bound = {
        e["path"]: (tuple(t["code"] for t in e["type"]), e["binding"]["valueSet"].split("|")[0])
        for d in definitions if d.get("derivation") != "constraint" and d.get("kind") != "logical"
        for e in d["snapshot"]["element"]
        if e.get("binding", {}).get("strength") == "required"
        and {t["code"] for t in e.get("type", [])} & {"Coding", "CodeableConcept"}
    }
    assert len(bound) == 14 and {types for types, _ in bound.values()} == {("CodeableConcept",)}
    checked = {path for entry in table().values() for path in entry.get("coded", {})}
    assert {path: value_set for path, (_, value_set) in bound.items() if path not in checked} == {
        "MolecularSequence.structureVariant.variantType": "http://loinc.org/vs/LL379-9",
    }


def test_every_problem_is_reported() -> None:
    resource = {"resourceType": "Patient", "active": "yes", "gender": 1, "name": [{"foo": 1}]}
    issues = r4_validate(resource).issues
    assert {e for i in issues for e in i.expression} == {"Patient.active", "Patient.gender", "Patient.name[0].foo"}


@pytest.mark.parametrize(("resource", "expression", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_over_http(fhir: httpx.Client, resource: dict[str, Any], expression: str, code: str) -> None:
    response = fhir.post(resource["resourceType"], content=jsonio.dumps(resource), headers=FHIR_JSON)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    found = {e: i["code"] for i in outcome["issue"] for e in i.get("expression", [])}
    assert found.get(expression) == code, found
    assert all(i["severity"] == "error" for i in outcome["issue"])


@pytest.mark.parametrize("resource", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_over_http(fhir: httpx.Client, resource: dict[str, Any]) -> None:
    sent = jsonio.dumps(resource)
    created = fhir.post(resource["resourceType"], content=sent, headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    read = fhir.get(created.headers["Location"].rsplit("/_history/", 1)[0])
    stored = jsonio.loads(read.content)
    assert jsonio.dumps({k: v for k, v in stored.items() if k not in ("id", "meta")}) == sent


def test_resource_type_must_match_the_url(fhir: httpx.Client) -> None:
    response = fhir.post("Patient", content=jsonio.dumps(OBSERVATION), headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["resourceType"]


def test_update_id_must_match_the_url(fhir: httpx.Client) -> None:
    body = {"resourceType": "Patient", "id": "other"}
    response = fhir.put("Patient/one", content=jsonio.dumps(body), headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Patient.id"]
    missing = fhir.put("Patient/one", content=b'{"resourceType":"Patient"}', headers=FHIR_JSON)
    assert missing.status_code == 400
    assert missing.json()["issue"][0]["expression"] == ["Patient.id"]


def test_invalid_meta_is_not_replaced_silently(fhir: httpx.Client) -> None:
    response = fhir.post("Patient", content=b'{"resourceType":"Patient","meta":["x"]}', headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Patient.meta"]


def test_transaction_entry_problem_names_the_entry(fhir: httpx.Client, server: LiveServer, db: Any) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"family": "Tx-valid-first"}]}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "active": "no"}, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    before = db["fhir_history"].count_documents({})
    response = fhir.post(server.fhir, content=jsonio.dumps(bundle), headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.active"]
    assert db["fhir_history"].count_documents({}) == before


def test_patch_result_is_validated(fhir: httpx.Client) -> None:
    created = fhir.post("Patient", content=b'{"resourceType":"Patient","active":true}', headers=FHIR_JSON)
    location = created.headers["Location"].rsplit("/_history/", 1)[0]
    patch = b'[{"op":"replace","path":"/active","value":"yes"}]'
    response = fhir.patch(location, content=patch, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Patient.active"]
    assert fhir.get(location).headers["ETag"] == 'W/"1"'


def test_validate_operation_reports_expressions(fhir: httpx.Client) -> None:
    response = fhir.post("Patient/$validate", content=b'{"resourceType":"Patient","birthDate":"1970-02-30"}', headers=FHIR_JSON)
    assert response.status_code == 200
    issues = response.json()["issue"]
    assert [i["expression"] for i in issues] == [["Patient.birthDate"]]


# --- fhir.resources: what it is given, and how its errors read ----------------------------


def test_fhir_resources_errors_read_as_fhirpath() -> None:
    resource = {"resourceType": "Observation", "contained": [observation(valueQuantity={"value": 1})]}
    assert fhirpath(resource, ("contained", 0, "valueQuantity", "value")) == "Observation.contained[0].value.ofType(Quantity).value"
    assert fhirpath(resource, ("status",)) == "Observation.status"
    assert fhirpath(resource, ()) == "Observation"


def test_fhir_resources_is_consulted_for_suitable_types() -> None:
    # Only reachable with a resource the R4 validator would refuse first, so called directly.
    issues = fhir_resources_issues({"resourceType": "Patient", "name": [{"foo": 1}]})
    assert [i.expression for i in issues] == [("Patient.name[0].foo",)]


def test_fhir_resources_agrees_on_r4_forms_it_handles_differently() -> None:
    """The R4-valid forms above pass fhir.resources' second look (its departures set aside)."""
    for name, resource in VALID:
        if r4_validate(resource).nested_types.isdisjoint(R4B_UNSUITABLE) and resource["resourceType"] not in R4B_UNSUITABLE:
            assert fhir_resources_issues(resource) == [], name


# --- R4B_UNSUITABLE: recomputed from the R4B models and the R4 definitions ----------------


def _unwrap(annotation: Any) -> tuple[bool, str]:
    """(repeating, type) of an R4B model field: `List[HumanNameType] | None` -> (True, ...HumanName)."""
    repeating = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        elif origin is list:
            repeating, annotation = True, typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            names = [getattr(m, "__visit_name__", None) for m in typing.get_args(annotation)[1:]]
            return repeating, next((n for n in names if n), repr(annotation))
        elif annotation is bool:
            return repeating, "boolean"
        else:
            return repeating, getattr(annotation, "_model_klass", None) or getattr(annotation, "__visit_name__", repr(annotation))


def _r4b_elements(model: Any, resource_root: bool) -> dict[str, tuple[bool, str, bool]]:
    elements = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias.startswith("_") or alias == "fhir_comments" or (alias == "resourceType" and resource_root):
            continue
        extra = field.json_schema_extra or {}
        required = field.is_required() or bool(extra.get("element_required") or extra.get("one_of_many_required"))
        elements[alias] = (*_unwrap(field.annotation), required)
    return elements


def _r4_elements(key: str) -> dict[str, tuple[bool, str, bool]]:
    """JSON name -> (repeating, type or '#backbone path', required) of the R4 children of key."""
    prefix = key + "."
    elements = {}
    for path, (minimum, maximum, element_types, _summary, reference) in table()[key.split(".")[0]]["elements"].items():
        if not path.startswith(prefix) or "." in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        for type_name in element_types if not reference else ["#" + reference]:
            if type_name in ("BackboneElement", "Element"):
                type_name = "#" + path
            json_name = name[:-3] + type_name[0].upper() + type_name[1:] if name.endswith("[x]") else name
            elements[json_name] = (maximum != "1", type_name, minimum >= 1)
    return elements


def _r4b_differences(resource_type: str) -> list[str]:
    """Where R4B's model of the type (and of the datatypes it uses) departs from R4.

    Extension is left out: its departures concern every type and are handled apart
    (validation.py); nested resources are validated by their own type."""
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return ["no R4B model"]
    differences: list[str] = []
    todo, seen = [(resource_type, model)], set()
    while todo:
        key, model = todo.pop()
        if (key, model) in seen:
            continue
        seen.add((key, model))
        r4 = _r4_elements(key)
        r4b = _r4b_elements(model, key == resource_type)
        for name in sorted(set(r4) ^ set(r4b)):
            differences.append(f"{key}.{name} only in {'R4' if name in r4 else 'R4B'}")
        for name in sorted(set(r4) & set(r4b)):
            (repeating, r4_type, required), (r4b_repeating, r4b_type, r4b_required) = r4[name], r4b[name]
            if (repeating, required) != (r4b_repeating, r4b_required):
                differences.append(f"{key}.{name} cardinality")
            if r4_type in ("Extension", "Resource"):
                continue
            if r4_type.startswith("#") or table()[r4_type]["kind"] != "primitive-type":
                module, _, name_in_module = r4b_type.rpartition(".")
                if not r4_type.startswith("#") and name_in_module != r4_type:
                    differences.append(f"{key}.{name} is {r4_type} in R4, {r4b_type} in R4B")
                    continue
                todo.append((r4_type.lstrip("#"), getattr(importlib.import_module(module), name_in_module)))
            elif r4_type != r4b_type:
                differences.append(f"{key}.{name} is {r4_type} in R4, {r4b_type} in R4B")
    return differences


def test_r4b_unsuitable_is_what_the_models_say() -> None:
    computed = {t: d for t in sorted(resource_types()) if (d := _r4b_differences(t))}
    assert set(computed) == R4B_UNSUITABLE, computed
    assert "EvidenceVariable.characteristic cardinality" in computed["EvidenceVariable"]
    assert any(d.startswith("Parameters.parameter.valueUuid is uuid in R4") for d in computed["Parameters"])
    assert "ActivityDefinition.subjectCanonical only in R4B" in computed["ActivityDefinition"]
