"""The FHIRPath expressions of search parameters, compiled into fast extractors.

Every resource written is indexed for every search parameter of its type, so evaluating
the parameters' FHIRPath with a general interpreter (fhirpathpy walks an AST per call)
would dominate the write path. The R4 definitions, though, use a tiny subset of FHIRPath:
paths with choice types (`Observation.value as Quantity`), `where(type='...')`,
`where(resolve() is Patient)`, `extension('url')`, an indexer, unions, and one boolean
form, `X.exists() and X != false` (Patient-deceased). `compile_path`
turns such an expression, with the element structure of R4 (server/fhir/structure.py),
into `Path`s: sequences of dictionary steps that each end in an element whose FHIR type
is known statically (a choice element becomes one path per type). Anything outside
that subset (custom parameters with functions) is evaluated by fhirpathpy, the library,
with the value types
read from the values themselves. tests/fhir/search checks that every R4 expression
compiles to one or the other and that both agree with fhirpathpy on the R4 examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from server.fhir import structure
from server.fhir.definitions import resource_types

Value = tuple[Any, str]  # (JSON value, FHIR type name)


def split_top(expression: str, separator: str) -> list[str]:
    """Split at `separator` outside parentheses and quoted strings."""
    parts, depth, current, quoted = [], 0, "", False
    for char in expression:
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        if char == separator and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def split_union(expression: str) -> list[str]:
    """The top-level `|` alternatives of a FHIRPath expression."""
    return [p.strip() for p in split_top(expression, "|") if p.strip()]


def expression_for_base(fragments: list[str], base: str) -> str:
    """The alternatives of a shared expression that apply to one base type.

    An alternative that starts with an element name rather than a type (R4's
    InsurancePlan-name is `name | alias`) is relative to the base.
    """
    own = []
    for fragment in fragments:
        if fragment[0].islower():
            fragment = f"{base}.{fragment}"
        bare = fragment.lstrip("(")
        if bare == base or bare.startswith((base + ".", base + " ")):
            own.append(fragment)
    return " | ".join(own)


# --- compiled paths -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Path:
    """Dictionary steps from a start node to values of one FHIR type.

    Steps: ("get", key), ("index", n), ("eq", key, literal), ("reftype", type),
    ("url", extension url), ("root",).
    """

    steps: tuple[tuple[Any, ...], ...]
    element: structure.Element

    @property
    def type(self) -> str:
        return self.element.types[0] if self.element.types else "BackboneElement"


class Unsupported(Exception):
    """The expression uses FHIRPath beyond the compiled subset."""


_AS = re.compile(r"^\((.+) as ([A-Za-z]+)\)(.*)$")
_STEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_INDEXED = re.compile(r"([A-Za-z][A-Za-z0-9]*)\[(\d+)\]")
_TYPE_FN = re.compile(r"(?:as|ofType)\(([A-Za-z]+)\)")
_RESOLVE_IS = re.compile(r"where\(resolve\(\) is ([A-Za-z]+)\)")
_WHERE_EQ = re.compile(r"where\(([a-z][A-Za-z]*)\s*=\s*'([^']*)'\)")
_EXTENSION = re.compile(r"extension\('([^']*)'\)")


def _normalize(fragment: str) -> str:
    """`(X as T).rest` -> `X.as(T).rest`, repeatedly."""
    fragment = fragment.strip()
    while True:
        match = _AS.match(fragment)
        if not match or match.group(1).count("(") != match.group(1).count(")"):
            return fragment
        fragment = f"{match.group(1)}.as({match.group(2)}){match.group(3)}"


def _children(element: structure.Element, name: str) -> list[tuple[str, structure.Element]]:
    """JSON keys and elements for `name` (several for a choice element)."""
    direct = structure.child(element, name)
    if direct is not None:
        return [(name, direct)]
    found = []
    for typed in structure.choice_names(element, name):
        typed_element = structure.child(element, typed)
        if typed_element is not None:
            found.append((typed, typed_element))
    if not found:
        raise Unsupported(f"{element.path} has no element {name!r}")
    return found


Partial = tuple[tuple[tuple[Any, ...], ...], structure.Element]


def compile_path(fragment: str, root: structure.Element, start: structure.Element) -> list[Path]:
    """Compile one union alternative, starting at `start` (the resource, or a composite's
    element for component expressions); `root` is the resource (for `%resource`)."""
    steps = split_top(_normalize(fragment), ".")
    partials: list[Partial] = [((), start)]
    first = steps[0]
    if first == "%resource":
        partials = [((("root",),), root)]
        steps = steps[1:]
    elif first == start.path and start.path == start.types[0]:
        steps = steps[1:]  # `Patient.name` from the Patient element
    for step in steps:
        partials = _apply(step, partials)
        if not partials:
            break
    return [Path(s, e) for s, e in partials]


def _apply(step: str, partials: list[Partial]) -> list[Partial]:
    out: list[Partial] = []
    if match := _TYPE_FN.fullmatch(step):
        wanted = match.group(1)
        for steps, element in partials:
            types = element.types
            if any(t.lower() == wanted.lower() for t in types):
                out.append((steps, element))
        return out
    if match := _RESOLVE_IS.fullmatch(step):
        target = match.group(1)
        if target not in resource_types():
            raise Unsupported(f"resolve() is {target}")
        return [(steps + (("reftype", target),), element) for steps, element in partials]
    if match := _WHERE_EQ.fullmatch(step):
        return [(steps + (("eq", match.group(1), match.group(2)),), e) for steps, e in partials]
    if match := _EXTENSION.fullmatch(step):
        for steps, element in partials:
            extension = structure.child(element, "extension")
            if extension is None:
                raise Unsupported(f"{element.path} has no extensions")
            out.append((steps + (("get", "extension"), ("url", match.group(1))), extension))
        return out
    if step == "first()":
        return [(steps + (("index", 0),), e) for steps, e in partials]
    index = None
    if match := _INDEXED.fullmatch(step):
        step, index = match.group(1), int(match.group(2))
    if not _STEP_NAME.fullmatch(step):
        raise Unsupported(step)
    for steps, element in partials:
        if element.types and element.types[0] in ("Resource",):
            raise Unsupported(f"navigation into a contained resource ({element.path}.{step})")
        for key, child in _children(element, step):
            added: tuple[tuple[Any, ...], ...] = (("get", key),)
            if index is not None:
                added += (("index", index),)
            out.append((steps + added, child))
    return out


def _values_of(nodes: list[Any], key: str) -> list[Any]:
    """The values of `key` in every object among `nodes`, arrays flattened."""
    found: list[Any] = []
    for node in nodes:
        if type(node) is dict:
            value = node.get(key)
            if value is not None:
                if type(value) is list:
                    found.extend(value)
                else:
                    found.append(value)
    return found


def walk(resource: dict[str, Any], start: Any, steps: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """Follow compiled steps from `start`; the values reached, arrays flattened."""
    nodes = [start]
    for step in steps:
        kind = step[0]
        if kind == "get":
            nodes = _values_of(nodes, step[1])
        elif kind == "index":
            nodes = nodes[step[1] : step[1] + 1]
        elif kind == "eq":
            nodes = [n for n in nodes if type(n) is dict and n.get(step[1]) == step[2]]
        elif kind == "url":
            nodes = [n for n in nodes if type(n) is dict and n.get("url") == step[1]]
        elif kind == "reftype":
            nodes = [n for n in nodes if reference_type(resource, n) == step[1]]
        else:  # root
            nodes = [resource]
        if not nodes:
            return nodes
    return nodes


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if type(value) is list else [value]


def reacher(steps: tuple[tuple[Any, ...], ...]) -> Callable[[dict[str, Any]], list[Any]]:
    """A function from the resource to the values of `steps`: plain dictionary look-ups
    for the common one- and two-key paths, the general `walk` otherwise."""
    if all(step[0] == "get" for step in steps):
        if len(steps) == 1:
            key = steps[0][1]
            return lambda resource: _as_list(resource.get(key))
        if len(steps) == 2:
            first, second = steps[0][1], steps[1][1]

            return lambda resource: _values_of(_as_list(resource.get(first)), second)
    return lambda resource: walk(resource, resource, steps)


def reference_type(resource: dict[str, Any], reference: Any) -> str | None:
    """The resource type a Reference points to (what `resolve() is T` tests)."""
    if type(reference) is not dict:
        return None
    literal = reference.get("reference")
    if isinstance(literal, str):
        if literal.startswith("#"):
            for contained in resource.get("contained", []) or []:
                if isinstance(contained, dict) and contained.get("id") == literal[1:]:
                    return contained.get("resourceType")
            return None
        parts = literal.split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) >= 2 and parts[-2] in resource_types():
            return parts[-2]
        return None
    kind = reference.get("type")
    return kind if isinstance(kind, str) else None


# --- the library fallback -------------------------------------------------------------------


def _shape(value: Any) -> str:
    """The FHIR type of a value fhirpathpy returned, read from its shape."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, (float, Decimal)):
        return "decimal"
    if isinstance(value, str):
        return "string"
    if not isinstance(value, dict):
        return "unknown"
    if "resourceType" in value:
        return "Resource"
    for keys, name in (
        (("coding",), "CodeableConcept"),
        (("reference",), "Reference"),
        (("family", "given"), "HumanName"),
        (("line", "city", "postalCode", "country"), "Address"),
        (("start", "end"), "Period"),
        (("low", "high"), "Range"),
        (("value", "unit"), "Quantity"),
    ):
        if any(k in value for k in keys):
            return name
    if "system" in value and "code" in value:
        return "Coding"
    if "value" in value and "system" in value:
        return "Identifier"
    if "text" in value:
        return "CodeableConcept"
    if "value" in value:
        return "Quantity"
    return "unknown"


@cache
def _fhirpathpy_compiled(expression: str) -> Callable[..., list[Any]]:
    from fhirpathpy import compile as fp_compile
    from fhirpathpy.models import models

    return fp_compile(expression, models["r4"])


def check_syntax(expression: str) -> None:
    """Raise ValueError unless `expression` parses as FHIRPath, whole. fhirpathpy's own
    parser ignores syntax errors (its listener does nothing with them) and evaluates the
    tree antlr recovered: `Patient.name.where((((` compiled, then failed at every write
    of a Patient with a name. Its generated lexer and parser are used here with a
    listener that raises."""
    from antlr4 import CommonTokenStream, InputStream
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class Raising(ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, message: str, error: Any) -> None:
            raise ValueError(f"not FHIRPath at character {column + 1}: {message}")

    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(Raising())
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(Raising())
    parser.entireExpression()


def evaluate_library(expression: str, resource: dict[str, Any]) -> list[Any]:
    """fhirpathpy's evaluation (plain JSON values in, plain values out)."""
    return list(_fhirpathpy_compiled(expression)(resource, {"resource": resource}))


# --- extractors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Extractor:
    """How to reach a parameter's values: compiled paths, or the library for `fallback`."""

    paths: tuple[Path, ...]
    fallback: str | None = None
    present_not_false: bool = False  # `X.exists() and X != false`: one boolean

    def values(self, resource: dict[str, Any], plain: Callable[[], dict[str, Any]]) -> list[Value]:
        if self.fallback is not None:
            return [(v, _shape(v)) for v in evaluate_library(self.fallback, plain())]
        found: list[Value] = []
        for path in self.paths:
            kind = path.type
            for value in walk(resource, resource, path.steps):
                found.append((value, kind))
        if self.present_not_false:
            return [(bool(found) and [v for v, _ in found] != [False], "boolean")]
        return found


_PRESENT_NOT_FALSE = re.compile(r"^(\S+)\.exists\(\) and \1 != false$")


def compile_expression(expression: str, type_: str) -> Extractor:
    """An extractor for a parameter expression on resource type `type_`."""
    root = structure.root(type_)
    if root is None:
        raise ValueError(f"{type_} is not a resource type")
    try:
        present = _PRESENT_NOT_FALSE.match(expression)
        if present:
            return Extractor(tuple(compile_path(present.group(1), root, root)), present_not_false=True)
        paths: list[Path] = []
        for fragment in split_union(expression):
            paths.extend(compile_path(fragment, root, root))
        return Extractor(tuple(paths))
    except Unsupported:
        evaluate_check(expression)
        return Extractor((), expression)


def evaluate_check(expression: str) -> None:
    """Fail now (ValueError) if even fhirpathpy cannot parse the expression."""
    try:
        _fhirpathpy_compiled(expression)
    except Exception as exc:  # fhirpathpy raises assorted parser errors
        raise ValueError(f"FHIRPath expression {expression!r} cannot be evaluated: {exc}") from None


def compile_relative(expression: str, type_: str, start: structure.Element) -> Extractor:
    """A composite component's extractor, relative to the composite's element."""
    root = structure.root(type_)
    assert root is not None
    try:
        paths: list[Path] = []
        for fragment in split_union(expression):
            paths.extend(compile_path(fragment, root, start))
        return Extractor(tuple(paths))
    except Unsupported as exc:
        raise ValueError(f"component expression {expression!r} is not supported: {exc}") from None
