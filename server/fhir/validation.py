"""Validation of every resource on its way in.

fhir.resources (pydantic models) checks structure, datatypes, cardinality, required
elements and the grammars of ids, dates and other primitives. Its models are FHIR R4B;
for the R4 resource types R4B dropped or redefined, `R4B_UNSUITABLE` routes validation to
the R4 StructureDefinition-based validator instead (server/fhir/structure.py).

Each problem becomes an OperationOutcome issue whose `expression` is the FHIRPath of the
element (`Patient.name[0].given[0]`), so a client can point at the field.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from server.fhir.outcome import FhirError, Issue

# A literal reference: relative (Type/id, optionally versioned), absolute URL, a
# fragment of a contained resource, or a URN (bundle-local references).
_REFERENCE = re.compile(
    r"(?:[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?"
    r"|#[A-Za-z0-9\-.]{0,64}"
    r"|urn:(?:uuid|oid):\S+"
    r"|[a-z][a-z0-9+.\-]*://\S+"
    r"|[A-Z][A-Za-z]+\?\S*)"
)
_REFERENCE_VALUES = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')


@cache
def _model(resource_type: str) -> type[pydantic.BaseModel] | None:
    try:
        return get_fhir_model_class(resource_type)
    except KeyError:
        return None


def expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into a FHIRPath expression."""
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "json-or-python")):
            path += f".{part}"
    return path


def _message(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "Unknown element"
    if kind == "missing" or kind.endswith(".missing"):
        return "Required element is missing"
    message = str(error.get("msg", "invalid"))
    return message.removeprefix("Value error, ")


def _issue_code(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "structure"
    if kind == "missing" or kind.endswith(".missing"):
        return "required"
    return "value"


def validate_fhir_resources(resource: dict[str, Any]) -> list[Issue]:
    resource_type = resource["resourceType"]
    model = _model(resource_type)
    if model is None:
        return [Issue("not-supported", f"{resource_type} cannot be validated")]
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        return [
            Issue(
                _issue_code(e),
                f"{_message(e)}: {expression(resource_type, e['loc'])}",
                "error",
                (expression(resource_type, e["loc"]),),
            )
            for e in exc.errors(include_url=False)
        ]
    except Exception as exc:  # fhir.resources raises KeyError etc. on some malformed input
        return [Issue("invalid", f"The resource is malformed: {exc!r}", "error", (resource_type,))]
    return []


def reference_issues(body: bytes) -> list[Issue]:
    """Check the grammar of every literal reference in a serialized resource."""
    issues = []
    for match in _REFERENCE_VALUES.finditer(body):
        value = match.group(1).decode("utf-8")
        if not _REFERENCE.fullmatch(value):
            issues.append(Issue("value", f"Invalid reference {value!r}"))
    return issues


def validate(resource: dict[str, Any]) -> None:
    """Raise a 400 FhirError listing every problem found in `resource`."""
    issues = validate_fhir_resources(resource)
    if issues:
        raise FhirError(400, issues)
