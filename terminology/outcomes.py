"""Terminology errors and issues in the form the terminology service spec uses.

Issues carry `details.coding` from the tx-issue-type code system and `details.text`,
plus `location`/`expression` for the element concerned, as the HL7 terminology tests
expect; `TxError` is answered as an OperationOutcome with its HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TX_ISSUE_TYPE = "http://hl7.org/fhir/tools/CodeSystem/tx-issue-type"


@dataclass(frozen=True)
class TxIssue:
    severity: str  # fatal | error | warning | information
    code: str  # IssueType
    text: str
    tx_code: str | None = None  # tx-issue-type (not-found, invalid-code, not-in-vs, ...)
    expression: tuple[str, ...] = ()
    diagnostics: str | None = None
    in_message: bool = True  # whether $validate-code's `message` repeats it

    def json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code}
        details: dict[str, Any] = {}
        if self.tx_code:
            details["coding"] = [{"system": TX_ISSUE_TYPE, "code": self.tx_code}]
        details["text"] = self.text
        issue["details"] = details
        if self.diagnostics:
            issue["diagnostics"] = self.diagnostics
        if self.expression:  # `location` is deprecated in favour of `expression`
            issue["expression"] = list(self.expression)
        return issue


def outcome(issues: list[TxIssue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.json() for i in issues]}


@dataclass
class TxError(Exception):
    status: int
    issues: list[TxIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(i.text for i in self.issues)


def tx_error(status: int, code: str, text: str, tx_code: str | None = None, diagnostics: str | None = None) -> TxError:
    return TxError(status, [TxIssue("error", code, text, tx_code, diagnostics=diagnostics)])
