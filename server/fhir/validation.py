"""Validation of every resource on its way in, to the letter of FHIR R4.

Two validators look at each resource:

1. The R4 validator (r4validator.py), driven by the R4 StructureDefinitions, checks every
   resource of every type: structure, JSON datatypes and grammars, cardinality, required
   elements, choice types, primitive extensions, nested resources, narrative. Its verdict
   decides.
2. fhir.resources, which the issue names as the validation library, then also validates
   the resources whose types R4B (the release its models implement) defines as R4 does.
   `R4B_UNSUITABLE` lists the others: the types R4B dropped (MedicinalProduct*,
   Substance{NucleicAcid,Polymer,Protein,ReferenceInformation,SourceMaterial,
   Specification}, EffectEvidenceSynthesis, RiskEvidenceSynthesis), redefined (Evidence,
   EvidenceVariable), extended (ActivityDefinition, PlanDefinition: R4B-only
   subjectCanonical) or whose open-typed values differ (Parameters, Task, StructureMap,
   StructureDefinition's ElementDefinition: R4B has no valueMeta and types uuid as a
   version-4 UUID). tests/fhir/test_validation.py recomputes the set by comparing every
   R4B model with the R4 definitions, so it cannot drift. A resource containing a
   resource of such a type (contained, Bundle entry, Parameters) is not handed over.

   Two departures of the library from R4 concern every type, so they are not in the set;
   the R4 validator judges these elements alone and the library's errors there are set
   aside (`_r4_judges_alone`): extension content (R4B's Extension lacks `_valueString`
   and the other primitive extensions of a value, and valueMeta; adds valueRatioRange
   and valueCodeableReference), and the lexical grammars, which the library evaluates
   with Unicode `\\s` (it rejects the R4-valid code "\\u00a0").

Each problem becomes an OperationOutcome issue whose `expression` is the FHIRPath of the
element (`Patient.name[0].given[0]`), so a client can point at the field.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from server.fhir import r4validator
from server.fhir.definitions import resource_types
from server.fhir.outcome import FhirError, Issue

R4B_UNSUITABLE = frozenset(
    {
        # Not in R4B.
        "EffectEvidenceSynthesis", "RiskEvidenceSynthesis",
        "MedicinalProduct", "MedicinalProductAuthorization", "MedicinalProductContraindication",
        "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect",
        "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
        "SubstanceReferenceInformation", "SubstanceSourceMaterial", "SubstanceSpecification",
        # Redefined in R4B.
        "Evidence", "EvidenceVariable",
        # R4B adds subjectCanonical.
        "ActivityDefinition", "PlanDefinition",
        # Open-typed values (value[x], fixed[x], ...): no Meta in R4B, uuid only version 4.
        "Parameters", "StructureDefinition", "StructureMap", "Task",
    }
)


def validate(resource: dict[str, Any], library: bool = True) -> bool:
    """Raise a 400 FhirError listing every problem found in `resource`.

    With `library=False` the fhir.resources check is left to the caller (a transaction
    runs it in a worker process, see library_checks.py); the answer says whether it is
    due.
    """
    result = r4validator.validate(resource)
    issues = result.issues
    due = not issues and R4B_UNSUITABLE.isdisjoint(result.nested_types | {resource["resourceType"]})
    if due and library:
        issues = fhir_resources_issues(resource)
    if issues:
        raise FhirError(400, issues)
    return due and not library


# --- fhir.resources -----------------------------------------------------------------------


@cache
def _model(resource_type: str) -> type[pydantic.BaseModel]:
    return get_fhir_model_class(resource_type)


def fhir_resources_issues(resource: dict[str, Any]) -> list[Issue]:
    """The problems fhir.resources finds in an R4-valid resource of an R4B-suitable type."""
    try:
        _model(resource["resourceType"]).model_validate(resource)
    except pydantic.ValidationError as exc:
        issues = []
        for error in exc.errors(include_url=False):
            if _r4_judges_alone(error):
                continue
            where = fhirpath(resource, error["loc"])
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            issues.append(Issue(_issue_code(error), f"{where}: {message}", "error", (where,)))
        return issues
    except Exception as exc:  # the library raises KeyError and others on some malformed input
        where = resource["resourceType"]
        return [Issue("invalid", f"{where}: the resource is malformed ({exc!r})", "error", (where,))]
    return []


def _r4_judges_alone(error: Any) -> bool:
    """Errors where the library departs from R4 for every type (see the module doc)."""
    if error.get("type") == "string_pattern_mismatch":
        return True
    return any(
        isinstance(part, str) and (part in ("extension", "modifierExtension") or part.startswith("_"))
        for part in error["loc"]
    )


def _issue_code(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "structure"
    if kind == "missing" or kind.endswith(".missing"):
        return "required"
    return "value"


def fhirpath(resource: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """The FHIRPath of a pydantic error location (`name.0.given` -> `Patient.name[0].given`),
    following the R4 rules alongside the data so that choice names read `value.ofType(X)`."""
    path = resource["resourceType"]
    data: Any = resource
    of: r4validator.Node | None = r4validator.node(path)
    resource_next = False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            data = data[part] if isinstance(data, list) and part < len(data) else None
        elif isinstance(part, str) and not part.startswith(("function-", "json-or-python")):
            rule = of.rules.get(part) if of is not None else None
            path += "." + (rule.step if rule is not None else part)
            data = data.get(part) if isinstance(data, dict) else None
            of = r4validator.node(rule.type) if rule is not None and rule.kind == r4validator.COMPLEX else None
            resource_next = rule is not None and rule.kind == r4validator.RESOURCE
        else:
            continue
        if resource_next and isinstance(data, dict) and data.get("resourceType") in resource_types():
            of = r4validator.node(data["resourceType"])
            resource_next = False
    return path
