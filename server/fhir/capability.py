"""The CapabilityStatement at /fhir/metadata, generated from what the code registers.

Routes record their interaction codes in `INTERACTIONS` as they are defined and operations
record themselves in `operations.OPERATIONS`; this module only reads those registries, so
the statement cannot claim an interaction that has no route, nor omit one that has.
Features that are flags rather than routes (conditional create, ...) are listed in
`FEATURES` by the module that implements them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from server.fhir.definitions import resource_types
from server.fhir.operations import OPERATIONS

# level ("type", "instance", "system") -> interaction codes with a route
INTERACTIONS: dict[str, set[str]] = {"type": set(), "instance": set(), "system": set()}
# CapabilityStatement.rest.resource flags, e.g. {"conditionalCreate": True}
FEATURES: dict[str, Any] = {
    "versioning": "versioned-update",
    "readHistory": True,
    "updateCreate": True,
}
# Contributions computed per resource type (search parameters, ...), registered by name.
RESOURCE_EXTRAS: dict[str, Callable[[str], dict[str, Any]]] = {}
# Other statements by `metadata?mode=`: mode -> (app services, base URL) -> resource.
OTHER_MODES: dict[str, Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]] = {}

# The order in which R4 lists the TypeRestfulInteraction codes.
_TYPE_ORDER = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]


def _software_version() -> str:
    try:
        return version("kuroshio")
    except PackageNotFoundError:
        return "0.0.0"


def _operation_entry(name: str) -> dict[str, str]:
    return {"name": name, "definition": OPERATIONS[name].definition}


def _resource(type_: str) -> dict[str, Any]:
    codes = INTERACTIONS["type"] | INTERACTIONS["instance"]
    entry: dict[str, Any] = {
        "type": type_,
        "interaction": [{"code": c} for c in _TYPE_ORDER if c in codes],
        **FEATURES,
    }
    for extra in RESOURCE_EXTRAS.values():
        entry.update(extra(type_))
    operations = [
        _operation_entry(name)
        for name, op in sorted(OPERATIONS.items())
        if op.applies_to(type_) and op.levels & {"type", "instance"}
    ]
    if operations:
        entry["operation"] = operations
    return entry


def capability_statement(base: str, software_date: str) -> dict[str, Any]:
    system_operations = [
        _operation_entry(name) for name, op in sorted(OPERATIONS.items()) if "system" in op.levels
    ]
    rest: dict[str, Any] = {
        "mode": "server",
        "resource": [_resource(t) for t in sorted(resource_types())],
        "interaction": [{"code": c} for c in ("transaction", "batch", "search-system", "history-system") if c in INTERACTIONS["system"]],
    }
    if system_operations:
        rest["operation"] = system_operations
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": software_date,
        "publisher": "Kuroshio",
        "kind": "instance",
        "software": {"name": "Kuroshio", "version": _software_version()},
        "implementation": {"description": "Kuroshio FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json", "application/merge-patch+json"],
        "rest": [rest],
    }
