"""Extended operations (`$name`): the registry, and the resource-level ones of R4 core.

An operation registers itself with `@operation(...)`; the router dispatches every
`/$name` at system, type and instance level through this registry, and the
CapabilityStatement lists exactly what is registered. GET is allowed only for operations
that do not affect state, with parameters taken from the query string, as the spec says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.fhir import interactions, jsonio, r4validator
from server.fhir.outcome import FhirError, Issue, error, outcome_json
from server.fhir.validation import validate
from server.store.fhir import FhirStore

Level = Literal["system", "type", "instance"]


@dataclass
class OperationCall:
    """One invocation: where it was called and with which parameters."""

    name: str
    level: Level
    type: str | None
    id: str | None
    version: str | None
    parameters: dict[str, Any]  # a Parameters resource (built from the query for GET)
    body: dict[str, Any] | None  # the request body when it is not a Parameters resource
    db: FhirStore
    services: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # request headers (lower-case names)

    def values(self, name: str) -> list[Any]:
        """The values of every parameter called `name` (value[x] or resource)."""
        found = []
        for parameter in self.parameters.get("parameter", []):
            if parameter.get("name") != name:
                continue
            if "resource" in parameter:
                found.append(parameter["resource"])
            else:
                found.extend(v for k, v in parameter.items() if k.startswith("value"))
        return found

    def value(self, name: str) -> Any:
        values = self.values(name)
        if len(values) > 1:
            raise error(400, "invalid", f"The parameter {name!r} may appear only once")
        return values[0] if values else None


@dataclass(frozen=True)
class OperationResult:
    body: dict[str, Any] | bytes
    status: int = 200


Handler = Callable[[OperationCall], Awaitable[OperationResult]]


@dataclass(frozen=True)
class Operation:
    name: str
    levels: frozenset[Level]
    handler: Handler
    definition: str
    types: frozenset[str] | None = None  # None: every resource type
    affects_state: bool = False

    def applies_to(self, type_: str | None) -> bool:
        return self.types is None or type_ in self.types


OPERATIONS: dict[str, Operation] = {}


def operation(
    name: str,
    levels: set[Level],
    definition: str,
    types: set[str] | None = None,
    affects_state: bool = False,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        OPERATIONS[name] = Operation(
            name, frozenset(levels), handler, definition,
            frozenset(types) if types is not None else None, affects_state,
        )
        return handler

    return register


def lookup(name: str, level: Level, type_: str | None, method: str) -> Operation:
    op = OPERATIONS.get(name)
    if op is None:
        raise error(404, "not-supported", f"The operation ${name} is not supported")
    if level not in op.levels or not op.applies_to(type_):
        where = f"on {type_}" if type_ else "at the system level"
        raise error(400, "not-supported", f"${name} cannot be invoked {where} at {level} level")
    if method == "GET" and op.affects_state:
        raise error(405, "not-supported", f"${name} changes data and must be invoked with POST")
    return op


def check_parameters(parameters: dict[str, Any]) -> None:
    """Refuse a Parameters body that handlers cannot read: one whose elements, nested
    resources included, do not have the JSON shapes R4 gives them (a `valueMeta` whose
    `tag` is a string, a ValueSet whose `compose` is), or whose `parameter` (or any
    `part`) is not a list of objects each with a string `name`.

    Handlers read values as R4 shapes them; a body such as `{"resourceType":
    "Parameters", "parameter": "x"}` or an inline ValueSet with `"compose": "x"` reached
    them unchecked and failed with AttributeError (a 500) instead of a 400. Only shapes
    are checked here: a missing or invalid value is the operation's to report in its own
    terms (a $validate-code result, an $expand error). Inline resources may carry
    elements R4 lacks or repeats it does not allow: terminology clients send R5
    definitions (`tx-resource`), and the engine reads what it knows of them.
    """
    problems = [issue for issue in r4validator.validate(parameters).issues if _unreadable(issue)]
    if problems:
        raise FhirError(400, problems)
    _check_names(parameters)


def _unreadable(issue: Issue) -> bool:
    if issue.code != "structure":
        return False
    inline = any(".resource." in expression for expression in issue.expression)
    problem = issue.diagnostics.split(": ", 1)[-1]
    later_version = problem.startswith((r4validator.UNKNOWN_ELEMENT, r4validator.NOT_REPEATING))
    return not (inline and later_version)


def _check_names(parameters: dict[str, Any], path: str = "Parameters") -> None:
    field = "parameter" if path == "Parameters" else "part"
    entries = parameters.get(field, [])
    if not isinstance(entries, list):
        raise error(400, "structure", f"{path}.{field} must be an array", f"{path}.{field}")
    for index, entry in enumerate(entries):
        where = f"{path}.{field}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise error(400, "structure", f"{where} must be an object with a string name", where)
        _check_names(entry, where)


def parameters_from_query(items: list[tuple[str, str]]) -> dict[str, Any]:
    """GET form: each query parameter becomes a string-valued operation parameter."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": name, "valueString": value} for name, value in items if not name.startswith("_")
        ],
    }


# --- $validate ----------------------------------------------------------------------------


@operation(
    "validate", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/Resource-validate"
)
async def validate_operation(call: OperationCall) -> OperationResult:
    """Report, in an OperationOutcome, whether the resource would be accepted (always 200)."""
    resource = call.body if call.body is not None else call.value("resource")
    mode = call.value("mode")
    if mode not in (None, "create", "update", "delete", "profile"):
        raise error(400, "invalid", f"Unknown validation mode {mode!r}")
    issues: list[Issue] = []
    if mode == "delete":
        if call.id is None:
            raise error(400, "invalid", "mode=delete needs the instance level ([type]/[id]/$validate)")
        assert call.type is not None
        await interactions.read(call.db, call.type, call.id)
    else:
        if not isinstance(resource, dict):
            raise error(400, "required", "Give the resource to validate as the body or as the 'resource' parameter")
        if resource.get("resourceType") != call.type:
            issues.append(Issue("invalid", f"The resource is a {resource.get('resourceType')}, not a {call.type}"))
        elif mode == "update" or call.id is not None:
            if resource.get("id") != call.id:
                issues.append(Issue("invalid", "The resource id must match the id in the URL", "error", ("id",)))
        try:
            candidate = interactions.stamp(resource, resource.get("id") or "validate", 1, interactions.now())
            if not issues:
                validate(candidate)
                interactions.serialize(candidate)
        except FhirError as exc:
            issues.extend(exc.issues)
    if not issues:
        issues.append(Issue("informational", "No issues detected", "information"))
    return OperationResult(outcome_json(issues))


# --- $meta, $meta-add, $meta-delete -------------------------------------------------------


def _meta_of(body: bytes) -> dict[str, Any]:
    return jsonio.loads(body).get("meta", {})


@operation("meta", {"instance"}, "http://hl7.org/fhir/OperationDefinition/Resource-meta")
async def meta_operation(call: OperationCall) -> OperationResult:
    assert call.type is not None and call.id is not None
    if call.version is not None:
        stored = await interactions.vread(call.db, call.type, call.id, call.version)
    else:
        stored = await interactions.read(call.db, call.type, call.id)
    assert stored.body is not None
    return OperationResult(_meta_parameters(_meta_of(stored.body)))


def _meta_parameters(meta: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": meta}]}


def _same_coding(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("system") == b.get("system") and a.get("code") == b.get("code")


def _change_meta(meta: dict[str, Any], change: dict[str, Any], add: bool) -> dict[str, Any]:
    result = dict(meta)
    for key in ("tag", "security"):
        current = list(result.get(key, []))
        for coding in change.get(key, []):
            present = any(_same_coding(c, coding) for c in current)
            if add and not present:
                current.append(coding)
            elif not add:
                current = [c for c in current if not _same_coding(c, coding)]
        if current:
            result[key] = current
        else:
            result.pop(key, None)
    profiles = list(result.get("profile", []))
    for profile in change.get("profile", []):
        if add and profile not in profiles:
            profiles.append(profile)
        elif not add and profile in profiles:
            profiles.remove(profile)
    if profiles:
        result["profile"] = profiles
    else:
        result.pop("profile", None)
    return result


async def _meta_change(call: OperationCall, add: bool) -> OperationResult:
    assert call.type is not None and call.id is not None
    change = call.value("meta")
    if not isinstance(change, dict):
        raise error(400, "required", "The parameter 'meta' (a Meta) is required")

    def apply(resource: dict[str, Any]) -> dict[str, Any]:
        resource["meta"] = _change_meta(resource.get("meta", {}), change, add)
        return resource

    written = await interactions.patch(call.db, call.type, call.id, apply, None)
    assert written.body is not None
    return OperationResult(_meta_parameters(_meta_of(written.body)))


@operation(
    "meta-add", {"instance"}, "http://hl7.org/fhir/OperationDefinition/Resource-meta-add",
    affects_state=True,
)
async def meta_add_operation(call: OperationCall) -> OperationResult:
    """Add tags, security labels and profiles (recorded as a new version)."""
    return await _meta_change(call, add=True)


@operation(
    "meta-delete", {"instance"}, "http://hl7.org/fhir/OperationDefinition/Resource-meta-delete",
    affects_state=True,
)
async def meta_delete_operation(call: OperationCall) -> OperationResult:
    """Remove tags, security labels and profiles (recorded as a new version)."""
    return await _meta_change(call, add=False)
