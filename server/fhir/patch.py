"""PATCH: JSON Patch (RFC 6902), FHIRPath Patch (http://hl7.org/fhir/R4/fhirpatch.html),
and JSON Merge Patch (RFC 7386), which clients such as fhirpy send as a partial resource.

JSON Patch is applied by the `jsonpatch` library. FHIRPath Patch needs to know *where*
an expression points, not only what it evaluates to, and FHIRPath engines (fhirpathpy)
return copies of values; so paths are resolved here by a small location-tracking
navigator: element names (choice types by their typed name), `[n]`, `where(criteria)`,
`first()`, `last()`, `single()`, `ofType(T)`. The criteria inside `where()` are full
FHIRPath, evaluated by fhirpathpy on each candidate. Whether a new element is a list comes
from the R4 structure (server/fhir/structure.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fhirpathpy
import jsonpatch
import jsonpointer

from server.fhir import jsonio, structure
from server.fhir.outcome import error

Resource = dict[str, Any]
Patcher = Callable[[Resource], Resource]


# --- JSON Patch ---------------------------------------------------------------------------


def json_patch(operations: Any) -> Patcher:
    if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
        raise error(400, "invalid", "A JSON Patch document is an array of operation objects")
    try:
        patch = jsonpatch.JsonPatch(operations)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise error(400, "invalid", f"Invalid JSON Patch: {exc}") from None

    def apply(resource: Resource) -> Resource:
        try:
            return patch.apply(resource)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise error(422, "processing", f"JSON Patch test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, KeyError, IndexError, TypeError) as exc:
            raise error(422, "processing", f"JSON Patch could not be applied: {exc}") from None

    return apply


# --- JSON Merge Patch ---------------------------------------------------------------------


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def merge_patch(document: Any) -> Patcher:
    if not isinstance(document, dict):
        raise error(400, "invalid", "A JSON Merge Patch is a JSON object")

    def apply(resource: Resource) -> Resource:
        return _merge(resource, document)

    return apply


# --- FHIRPath Patch: locating elements ----------------------------------------------------


@dataclass(slots=True)
class Location:
    """Where a value sits: `container[key]`, with the definition of that element."""

    container: Any
    key: str | int
    element: structure.Element | None

    @property
    def value(self) -> Any:
        return self.container[self.key]


def split_steps(path: str) -> list[str]:
    """Split a FHIRPath at top-level dots, keeping function arguments and strings whole."""
    steps, depth, quote, start = [], 0, False, 0
    for index, char in enumerate(path):
        if quote:
            if char == "'" and path[index - 1] != "\\":
                quote = False
        elif char == "'":
            quote = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "." and depth == 0:
            steps.append(path[start:index])
            start = index + 1
    steps.append(path[start:])
    if any(not s.strip() for s in steps) or depth != 0 or quote:
        raise error(400, "invalid", f"Cannot parse the FHIRPath {path!r}")
    return [s.strip() for s in steps]


def _children(location: Location, name: str) -> list[Location]:
    node = location.value
    if not isinstance(node, dict):
        return []
    parent = location.element
    key = name
    if name not in node and parent is not None:
        # `value` on an Observation means whichever `value[x]` is present.
        for typed in structure.choice_names(parent, name):
            if typed in node:
                key = typed
                break
    if key not in node:
        return []
    element = structure.child(parent, key) if parent is not None else None
    value = node[key]
    if isinstance(value, list):
        return [Location(value, i, element) for i in range(len(value))]
    return [Location(node, key, element)]


def _function(locations: list[Location], step: str) -> list[Location]:
    name, _, rest = step.partition("(")
    argument = rest[:-1].strip() if rest.endswith(")") else None
    if argument is None:
        raise error(400, "invalid", f"Cannot parse {step!r}")
    if name == "where":
        kept = []
        for location in locations:
            try:
                result = fhirpathpy.evaluate(jsonio.plain(location.value), argument)
            except Exception as exc:  # fhirpathpy raises many exception types for bad input
                raise error(400, "invalid", f"Cannot evaluate {argument!r}: {exc}") from None
            if result == [True]:
                kept.append(location)
        return kept
    if name == "first" and not argument:
        return locations[:1]
    if name == "last" and not argument:
        return locations[-1:]
    if name == "single" and not argument:
        if len(locations) > 1:
            raise error(400, "invalid", "single() found more than one element")
        return locations
    if name == "ofType":
        return [
            loc for loc in locations
            if isinstance(loc.value, dict) and loc.value.get("resourceType") == argument
            or (loc.element is not None and loc.element.types == (argument,))
        ]
    raise error(400, "not-supported", f"The FHIRPath function {name}() is not supported in patches")


def locate(resource: Resource, path: str) -> list[Location]:
    """Every location the path points at in `resource`."""
    steps = split_steps(path)
    head = steps[0]
    if head != resource["resourceType"]:
        raise error(400, "invalid", f"The path {path!r} must start with {resource['resourceType']}")
    holder = {"root": resource}
    locations = [Location(holder, "root", structure.root(head))]
    for step in steps[1:]:
        if "(" in step:
            locations = _function(locations, step)
            continue
        name, _, index = step.partition("[")
        found = [child for loc in locations for child in _children(loc, name)]
        if index:
            position = index.rstrip("]")
            if not (position.isascii() and position.isdigit()):
                raise error(400, "invalid", f"Cannot parse the indexer in {step!r}")
            found = found[int(position) : int(position) + 1]
        locations = found
    return locations


def locate_one(resource: Resource, path: str) -> Location:
    found = locate(resource, path)
    if len(found) != 1:
        raise error(400, "processing", f"The path {path!r} matches {len(found)} elements; it must match one")
    return found[0]


def locate_list(resource: Resource, path: str) -> tuple[dict[str, Any], str, structure.Element | None]:
    """The object and member name holding the list a path names (for insert and move)."""
    steps = split_steps(path)
    if len(steps) < 2 or not steps[-1].isidentifier():
        raise error(400, "invalid", f"The path {path!r} must end with the name of a list element")
    parent = locate_one(resource, ".".join(steps[:-1]))
    if not isinstance(parent.value, dict):
        raise error(400, "processing", f"{path!r} is not inside an element")
    element = structure.child(parent.element, steps[-1]) if parent.element else None
    if element is not None and not element.repeating:
        raise error(400, "processing", f"{path!r} is not a repeating element")
    return parent.value, steps[-1], element


# --- FHIRPath Patch: operations -----------------------------------------------------------


def _parts(parameter: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p.get("name"): p for p in parameter.get("part", []) if isinstance(p, dict)}


def _value(part: dict[str, Any] | None) -> Any:
    """The value of a `value` part: a value[x], or parts building an anonymous element."""
    if part is None:
        raise error(400, "required", "The operation needs a value")
    for key, value in part.items():
        if key.startswith("value") and key != "value":
            return copy.deepcopy(value)
    if "part" in part:
        built: dict[str, Any] = {}
        for sub in part["part"]:
            name = sub.get("name")
            if not isinstance(name, str):
                raise error(400, "invalid", "Each part of a complex value needs a name")
            built.setdefault(name, []).append(_value(sub))
        return {k: v[0] if len(v) == 1 else v for k, v in built.items()}
    raise error(400, "required", "The value part has no value[x] and no parts")


def _string(parts: dict[str, dict[str, Any]], name: str) -> str:
    part = parts.get(name)
    value = next((v for k, v in (part or {}).items() if k.startswith("value")), None)
    if not isinstance(value, str):
        raise error(400, "required", f"The operation needs a {name}")
    return value


def _integer(parts: dict[str, dict[str, Any]], name: str) -> int:
    value = (parts.get(name) or {}).get("valueInteger")
    if not isinstance(value, int):
        raise error(400, "required", f"The operation needs an integer {name}")
    return value


def _add(resource: Resource, parts: dict[str, dict[str, Any]]) -> None:
    target = locate_one(resource, _string(parts, "path"))
    name, value = _string(parts, "name"), _value(parts.get("value"))
    node = target.value
    if not isinstance(node, dict):
        raise error(400, "processing", "add needs a path that points at an element")
    element = structure.child(target.element, name) if target.element else None
    if target.element is not None and element is None:
        raise error(400, "processing", f"{name!r} is not an element of {target.element.path}")
    if element is not None and element.repeating:
        node.setdefault(name, [])
        if not isinstance(node[name], list):
            raise error(400, "processing", f"{name!r} is not a list")
        node[name].append(value)
    elif name in node:
        raise error(400, "processing", f"{name!r} already has a value; use replace")
    else:
        node[name] = value


def _insert(resource: Resource, parts: dict[str, dict[str, Any]]) -> None:
    holder, name, _ = locate_list(resource, _string(parts, "path"))
    items = holder.setdefault(name, [])
    index = _integer(parts, "index")
    if not 0 <= index <= len(items):
        raise error(400, "processing", f"index {index} is outside the list (length {len(items)})")
    items.insert(index, _value(parts.get("value")))


def _delete(resource: Resource, parts: dict[str, dict[str, Any]]) -> None:
    found = locate(resource, _string(parts, "path"))
    if not found:
        return
    if len(found) > 1:
        raise error(400, "processing", "delete matches more than one element")
    target = found[0]
    del target.container[target.key]
    if isinstance(target.container, list) and not target.container:
        _remove_empty_lists(resource)


def _remove_empty_lists(node: Any) -> None:
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if v == [] or v == {}]:
            del node[key]
        for value in node.values():
            _remove_empty_lists(value)
    elif isinstance(node, list):
        for value in node:
            _remove_empty_lists(value)


def _replace(resource: Resource, parts: dict[str, dict[str, Any]]) -> None:
    target = locate_one(resource, _string(parts, "path"))
    target.container[target.key] = _value(parts.get("value"))


def _move(resource: Resource, parts: dict[str, dict[str, Any]]) -> None:
    holder, name, _ = locate_list(resource, _string(parts, "path"))
    items = holder.get(name, [])
    source, destination = _integer(parts, "source"), _integer(parts, "destination")
    if not (0 <= source < len(items) and 0 <= destination < len(items)):
        raise error(400, "processing", "move source or destination is outside the list")
    items.insert(destination, items.pop(source))


_OPERATIONS = {"add": _add, "insert": _insert, "delete": _delete, "replace": _replace, "move": _move}


def fhirpath_patch(parameters: Any) -> Patcher:
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise error(400, "invalid", "A FHIRPath Patch is a Parameters resource")
    operations = []
    for parameter in parameters.get("parameter", []):
        if not isinstance(parameter, dict) or parameter.get("name") != "operation":
            raise error(400, "invalid", "Every parameter of a FHIRPath Patch must be an 'operation'")
        parts = _parts(parameter)
        kind = _string(parts, "type")
        if kind not in _OPERATIONS:
            raise error(400, "invalid", f"Unknown FHIRPath Patch operation {kind!r}")
        operations.append((_OPERATIONS[kind], parts))

    def apply(resource: Resource) -> Resource:
        for operation, parts in operations:
            operation(resource, parts)
        return resource

    return apply
