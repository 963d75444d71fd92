"""Comparing a server's answer with an HL7 terminology test's expected answer.

This is the comparison the upstream runner (the FHIR validator's `-txtests`) makes,
rewritten from its documented behaviour: the actual resource is first scrubbed (text,
meta and unmanaged extensions removed, OperationOutcome diagnostics dropped) and sorted
(so array order never matters), then compared property by property with the expected
JSON, whose strings may be patterns: `$$`, `$instant$`, `$uuid$`, `$id$`,
`$choice:a|b$`, `$fragments:a|b$`, `$external:n:fragment$`; objects may list
`$optional-properties$` and `$count-arrays$`, and array items may be `$optional$`
(always, or only in some modes: `!mode`, `warning:...`).
"""

from __future__ import annotations

import re
from typing import Any

MANAGED_EXTENSIONS = {
    "http://hl7.org/fhir/StructureDefinition/codesystem-alternate",
    "http://hl7.org/fhir/StructureDefinition/codesystem-conceptOrder",
    "http://hl7.org/fhir/StructureDefinition/codesystem-label",
    "http://hl7.org/fhir/StructureDefinition/coding-sctdescid",
    "http://hl7.org/fhir/StructureDefinition/itemWeight",
    "http://hl7.org/fhir/StructureDefinition/rendering-style",
    "http://hl7.org/fhir/StructureDefinition/rendering-xhtml",
    "http://hl7.org/fhir/StructureDefinition/translation",
    "http://hl7.org/fhir/StructureDefinition/valueset-concept-definition",
    "http://hl7.org/fhir/StructureDefinition/valueset-conceptOrder",
    "http://hl7.org/fhir/StructureDefinition/valueset-deprecated",
    "http://hl7.org/fhir/StructureDefinition/valueset-label",
    "http://hl7.org/fhir/StructureDefinition/valueset-supplement",
    "http://hl7.org/fhir/test/CodeSystem/de-multi",
    "http://hl7.org/fhir/test/CodeSystem/en-multi",
    "http://hl7.org/fhir/test/StructureDefinition/unknown-extension-1",
    "http://hl7.org/fhir/test/StructureDefinition/unknown-extension-3",
    "http://hl7.org/fhir/test/StructureDefinition/unknown-extension-4",
    "http://hl7.org/fhir/test/StructureDefinition/unknown-extension-5",
    "http://hl7.org/fhir/test/ValueSet/extensions-bad-supplement",
    "http://hl7.org/fhir/test/ValueSet/simple-all",
    "http://hl7.org/fhir/test/ValueSet/simple-enumerated",
    "http://hl7.org/fhir/StructureDefinition/alternate-code-use",
    "http://hl7.org/fhir/StructureDefinition/alternate-code-status",
    "http://hl7.org/fhir/test/ValueSet/simple-filter-isa",
}

_INSTANT = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


# --- scrubbing ------------------------------------------------------------------------------


def _managed(url: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.\-]*:", url or "") or url in MANAGED_EXTENSIONS


def _scrub_extensions(node: Any, under_compose: bool = False) -> None:
    if isinstance(node, dict):
        if not under_compose:
            for key in ("extension", "modifierExtension"):
                if isinstance(node.get(key), list):
                    kept = [e for e in node[key] if isinstance(e, dict) and _managed(e.get("url", ""))]
                    if kept:
                        node[key] = kept
                    else:
                        node.pop(key)
        for key, child in node.items():
            _scrub_extensions(child, under_compose or key == "compose")
    elif isinstance(node, list):
        for child in node:
            _scrub_extensions(child, under_compose)


def scrub(resource: dict[str, Any]) -> dict[str, Any]:
    resource.pop("meta", None)
    if resource.get("resourceType") != "Parameters":
        resource.pop("text", None)
    _scrub_extensions(resource)
    for part in resource.get("parameter", []):
        if isinstance(part.get("resource"), dict):
            scrub(part["resource"])
    if resource.get("resourceType") == "OperationOutcome":
        issues = [i for i in resource.get("issue", []) if not ("diagnostics" in i and "details" not in i)]
        for issue in issues:
            issue.pop("diagnostics", None)
        resource["issue"] = issues
    return resource


# --- sorting ------------------------------------------------------------------------------


def _primitive(item: dict[str, Any]) -> str:
    for key, val in item.items():
        if key.startswith("value") and not isinstance(val, (dict, list)):
            return str(val).lower() if not isinstance(val, bool) else str(val).lower()
    return ""


def _part(parameter: dict[str, Any], name: str) -> dict[str, Any]:
    return next((p for p in parameter.get("part", []) if p.get("name") == name), {})


def _parameter_key(p: dict[str, Any]) -> tuple[str, str, str]:
    name = p.get("name", "")
    if name == "property":
        return name, _primitive(_part(p, "code")), _primitive(_part(p, "value"))
    if name == "designation":
        return name, _primitive(_part(p, "language")), _primitive(_part(p, "value"))
    return name, "", ""


def _sort_extensions(node: dict[str, Any]) -> None:
    if isinstance(node.get("extension"), list):
        for e in node["extension"]:
            _sort_extensions(e)
        node["extension"].sort(key=lambda e: e.get("url", ""))


def sort_parameters(resource: dict[str, Any]) -> None:
    for p in resource.get("parameter", []):
        _sort_extensions(p)
        _sort_parts(p)
        inner = p.get("resource")
        if isinstance(inner, dict) and inner.get("resourceType") == "OperationOutcome":
            sort_outcome(inner)
        if isinstance(inner, dict) and inner.get("resourceType") == "Parameters":
            sort_parameters(inner)
        if p.get("name") == "message" and isinstance(p.get("valueString"), str) and "; " in p["valueString"]:
            p["valueString"] = "; ".join(sorted(p["valueString"].split("; ")))
    resource.get("parameter", []).sort(key=_parameter_key)


def _sort_parts(p: dict[str, Any]) -> None:
    for part in p.get("part", []):
        _sort_parts(part)
    if "part" in p:
        p["part"].sort(key=_parameter_key)


def sort_outcome(resource: dict[str, Any]) -> None:
    def key(i: dict[str, Any]) -> tuple[str, str, str, str]:
        expression = (i.get("expression") or [""])[0]
        return i.get("severity", ""), i.get("code", ""), expression, (i.get("details") or {}).get("text", "")

    resource.get("issue", []).sort(key=key)


def _sort_contains(item: dict[str, Any]) -> None:
    for child in item.get("contains", []):
        _sort_contains(child)
    if "contains" in item:
        item["contains"].sort(key=lambda c: c.get("code", ""))
    _sort_extensions(item)
    if "designation" in item:
        item["designation"].sort(key=lambda d: (d.get("language") or "", d.get("value") or ""))
    if "property" in item:
        item["property"].sort(key=lambda p: p.get("code", ""))


def sort_value_set(resource: dict[str, Any]) -> None:
    _sort_extensions(resource)
    expansion = resource.get("expansion")
    if isinstance(expansion, dict):
        expansion.get("parameter", []).sort(key=lambda p: (p.get("name", ""), _primitive(p)))
        expansion.get("property", []).sort(key=lambda p: (p.get("uri") or "", p.get("code", "")))
        _sort_extensions(expansion)
        _sort_contains(expansion)


def normalize(resource: dict[str, Any]) -> dict[str, Any]:
    scrub(resource)
    kind = resource.get("resourceType")
    if kind == "Parameters":
        sort_parameters(resource)
    elif kind == "ValueSet":
        sort_value_set(resource)
    elif kind == "OperationOutcome":
        sort_outcome(resource)
    return resource


# --- comparing ----------------------------------------------------------------------------


class Comparer:
    def __init__(self, modes: set[str], externals: dict[str, str] | None = None, fhir_version: str = "4.0.1") -> None:
        self.modes = modes
        self.externals = externals
        self.fhir_version = fhir_version

    def compare(self, expected: Any, actual: Any, path: str = "") -> str | None:
        if isinstance(expected, dict) and isinstance(actual, dict):
            return self._objects(expected, actual, path)
        if isinstance(expected, list) and isinstance(actual, list):
            return self._arrays(expected, actual, path, count_only=False)
        if isinstance(expected, (dict, list)) or isinstance(actual, (dict, list)):
            return f"properties differ at {path}: expected {type(expected).__name__}, got {type(actual).__name__}"
        if isinstance(expected, bool) or isinstance(actual, bool):
            if expected is not actual:
                return f"boolean property values differ at {path}: expected {expected}, got {actual}"
            return None
        if isinstance(expected, str) and isinstance(actual, str):
            if "<div" in expected and "<div" in actual:
                return None
            if not self.matches(actual, expected):
                return f"string property values differ at {path}: expected {expected!r}, got {actual!r}"
            return None
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) or type(expected).__name__ == "Decimal":
            if str(expected) != str(actual):
                return f"number property values differ at {path}: expected {expected}, got {actual}"
            return None
        if expected is None and actual is None:
            return None
        return f"property types differ at {path}: expected {expected!r}, got {actual!r}"

    def _objects(self, expected: dict[str, Any], actual: dict[str, Any], path: str) -> str | None:
        optionals = set(expected.get("$optional-properties$", []))
        if optionals:
            optionals |= {"$optional-properties$", "$count-arrays$"}
        count_only = set(expected.get("$count-arrays$", []))
        for name, value in actual.items():
            if name == "fhir_comments":
                continue
            if name not in expected:
                return f"properties differ at {path}: unexpected property {name}"
            if name in count_only and isinstance(value, list):
                if len(value) != len(expected[name]):
                    return f"array item count differs at {path}.{name}: expected {len(expected[name])}, got {len(value)}"
                continue
            problem = self.compare(expected[name], value, f"{path}.{name}")
            if problem:
                return problem
        for name, value in expected.items():
            if name in ("fhir_comments", "$optional$") or name in optionals or "*" in optionals:
                continue
            if name.startswith("$") and name.endswith("$"):
                continue
            if name not in actual and not self._all_optional(value):
                return f"properties differ at {path}: missing property {name}"
        return None

    def _all_optional(self, value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(e, dict) and "$optional$" in e for e in value if isinstance(e, dict))

    def _optional(self, item: Any) -> bool:
        if not isinstance(item, dict) or "$optional$" not in item:
            return False
        flag = item["$optional$"]
        if isinstance(flag, bool):
            return flag
        token = str(flag)
        if token.startswith("!"):
            return token[1:] not in self.modes
        if token.startswith("warning:"):
            return True
        return token in self.modes

    def _arrays(self, expected: list[Any], actual: list[Any], path: str, count_only: bool) -> str | None:
        minimum = sum(1 for e in expected if not self._optional(e))
        optional_count = len(expected) - minimum
        if len(actual) > len(expected) or len(actual) < minimum:
            return f"array item count differs at {path}: expected {len(expected)}, got {len(actual)}"
        c = 0
        for i, item in enumerate(expected):
            if c >= len(actual):
                if i >= len(expected) - optional_count and self._optional(item):
                    return None
                return f"one or more array items did not match at {path} starting at index {i}"
            problem = self.compare(item, actual[c], f"{path}[{i}]")
            if problem and not self._optional(item):
                return problem
            if not problem:
                c += 1
        if c < len(actual):
            return f"unexpected node found in array at {path} at index {c}"
        return None

    def matches(self, actual: str, expected: str) -> bool:
        if not (expected.startswith("$") and expected.endswith("$") and len(expected) > 1):
            return actual == expected.replace("$version$", self.fhir_version)
        body = expected[1:-1]
        if body.startswith("choice:"):
            return actual in body[len("choice:"):].split("|")
        if body.startswith("fragments:"):
            return all(f.lower() in actual.lower() for f in body[len("fragments:"):].split("|"))
        if body.startswith("external:"):
            parts = body.split(":", 2)
            if self.externals is not None and parts[1] in self.externals:
                return actual == self.externals[parts[1]]
            if len(parts) < 3:
                return True
            return all(f.lower() in actual.lower() for f in parts[2].split("|"))
        simple = {
            "": lambda a: True,
            "instant": lambda a: _INSTANT.fullmatch(a) is not None,
            "uuid": lambda a: _UUID.fullmatch(a) is not None,
            "id": lambda a: _ID.fullmatch(a) is not None,
            "string": lambda a: a == a.strip(),
            "version": lambda a: a == self.fhir_version,
        }
        test = simple.get(body)
        return test(actual) if test else actual == expected
