"""OperationOutcome: how every FHIR error (and some successes) is reported.

Services raise `FhirError`; the HTTP layer turns it into an OperationOutcome with the
status it carries. Issue `code`s come from the R4 IssueType value set, and `expression`
holds the FHIRPath of the offending element where there is one, as the spec asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson

Severity = Literal["fatal", "error", "warning", "information"]
SEVERITIES: frozenset[str] = frozenset(get_args(Severity))


@dataclass(frozen=True, slots=True)
class Issue:
    code: str
    diagnostics: str
    severity: Severity = "error"
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        issue: dict[str, object] = {"severity": self.severity, "code": self.code}
        if self.diagnostics:
            issue["diagnostics"] = self.diagnostics
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


@dataclass
class FhirError(Exception):
    """An error with the HTTP status and the issues to report."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues)


def error(status: int, code: str, diagnostics: str, *expression: str) -> FhirError:
    return FhirError(status, [Issue(code, diagnostics, "error", tuple(expression))])


def not_found(type_: str, id_: str) -> FhirError:
    return error(404, "not-found", f"{type_}/{id_} is not known")


def issues_of(outcome: Any, fallback: str) -> list[Issue]:
    """The issues of an OperationOutcome in JSON (an answer of this server's, dispatched in
    process), or one issue saying `fallback` when it holds none."""
    found = outcome.get("issue") if isinstance(outcome, dict) else None
    issues = [
        Issue(
            str(item.get("code", "processing")),
            str(item.get("diagnostics", "")),
            item["severity"] if item.get("severity") in SEVERITIES else "error",
            tuple(e for e in item.get("expression", ()) if isinstance(e, str)),
        )
        for item in (found if isinstance(found, list) else ())
        if isinstance(item, dict)
    ]
    return issues or [Issue("processing", fallback)]


def outcome_json(issues: list[Issue]) -> dict[str, object]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def outcome_bytes(issues: list[Issue]) -> bytes:
    return orjson.dumps(outcome_json(issues))


def information(diagnostics: str) -> bytes:
    return outcome_bytes([Issue("informational", diagnostics, "information")])
