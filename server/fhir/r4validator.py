"""Validation of a resource's JSON against the FHIR R4 StructureDefinitions.

The rules come from the R4 definition table (server/fhir/definitions/structure.json.gz,
built from the official StructureDefinitions): for every object in the resource, each
property must be an element R4 defines there (unknown ones are errors), with the JSON
shape of its cardinality (an array exactly when max is not 1, never empty), of its type
(primitives by their JSON form and R4 grammar, see primitives.py; complex types and
backbone elements recursively), present when min is 1, and at most one of the typed
names of a choice element (`value[x]`). Primitive extensions (`_given`) must sit next to
a primitive element and, for repeating ones, align with its array (null only where the
other array has an entry). Objects are never empty and hold more than an `id` (ele-1).
Contained resources, Bundle entries and Parameters resources are validated as the
resources their `resourceType` names.

Why not a library: fhir.resources implements R4B, not R4 (R4 types are missing or
redefined there, see validation.py), and accepts JSON R4 forbids ("true" for a boolean,
1.0 for an integer, empty objects and arrays, nulls). A JSON-schema validator over the
official R4 JSON schema would need that schema shipped, cannot express the alignment of
`_given` with `given`, and reports JSON pointers, not FHIRPath. The StructureDefinitions
are the normative definitions, and the server already ships them as a table.

Every problem is an `Issue` whose expression is the FHIRPath of the element:
`Patient.name[0].given[0]`, `Observation.value.ofType(Quantity).value`,
`Bundle.entry[2].resource.status`.

Required bindings are checked where R4's definitions enumerate the value set
(terminologies.html#required: "the concept in this element SHALL be from the specified
value set"):
- on `code` elements: 339 of the 352 such elements (status codes, genders, units of
  time, ...); the other 13 bind to media types (BCP-13) and currencies (ISO 4217), which
  the definitions do not list;
- on Coding and CodeableConcept elements (see `Binding`): R4 binds 14 such elements with
  strength required, all of them CodeableConcepts; 10 are checked: Condition and
  AllergyIntolerance .clinicalStatus and .verificationStatus, AdverseEvent.severity and
  .outcome, Measure and MeasureReport .improvementNotation, SupplyDelivery.type and
  InsurancePlan.plan.specificCost.benefit.cost.applicability. The other 4 bind to all of
  UCUM (a grammar, not a list: the unitOfMeasure of EffectEvidenceSynthesis,
  RiskEvidenceSynthesis and ResearchElementDefinition.characteristic) and to a LOINC
  answer list the definitions do not hold (MolecularSequence.structureVariant.variantType).
Extensible, preferred and example bindings are not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from server.fhir import primitives
from server.fhir.definitions import resource_types
from server.fhir.outcome import Issue
from server.fhir.structure import table
from terminology.builtin import UCUM, ucum_valid

PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2

# The literal forms of Reference.reference (references.html#literal): relative
# `Type/id[/_history/vid]`, a fragment of a contained resource, a URN (bundle-local),
# an absolute URL, or a conditional reference `Type?query` (transaction bundles).
LITERAL_REFERENCE = re.compile(
    r"(?:[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?"
    r"|#[A-Za-z0-9\-.]{0,64}"
    r"|urn:(?:uuid|oid):\S+"
    r"|[a-z][a-z0-9+.\-]*://\S+"
    r"|[A-Z][A-Za-z]+\?\S*)"
)


@dataclass(slots=True)
class Rule:
    """One JSON property an object may have."""

    name: str  # as in JSON: "given", "valueQuantity"
    step: str  # as a FHIRPath step: "given", "value.ofType(Quantity)"
    repeating: bool
    kind: int
    type: str  # the FHIR type, or the backbone path whose children apply ("Patient.contact")
    choice: str | None = None  # the choice element's stem ("value") for typed names
    check: primitives.Checker | None = None
    target: Node | None = None  # for COMPLEX: node(type), resolved on first use
    binding: Binding | None = None  # for a Coding or CodeableConcept: its required binding

    def node(self) -> Node:
        if self.target is None:
            self.target = node(self.type)
        return self.target


@dataclass(slots=True)
class Node:
    """The rules of one kind of object: a resource, a datatype or a backbone element."""

    rules: dict[str, Rule]
    # (FHIRPath step, the JSON names any of which satisfies it) for each min-1 element.
    required: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    resource: bool = False


_NODES: dict[str, Node] = {}


def node(key: str) -> Node:
    """The compiled rules for a type name or a backbone element path."""
    compiled = _NODES.get(key)
    if compiled is None:
        compiled = _NODES[key] = _compile(key)
    return compiled


def _capitalized(type_name: str) -> str:
    return type_name[0].upper() + type_name[1:]


def _rule(name: str, step: str, repeating: bool, type_name: str, path: str, choice: str | None) -> Rule:
    if type_name in ("BackboneElement", "Element"):
        return Rule(name, step, repeating, COMPLEX, path, choice)
    if type_name == "Resource":
        return Rule(name, step, repeating, RESOURCE, type_name, choice)
    if primitives.is_primitive(type_name):
        return Rule(name, step, repeating, PRIMITIVE, type_name, choice, primitives.checker(type_name))
    return Rule(name, step, repeating, COMPLEX, type_name, choice)


def _compile(key: str) -> Node:
    definition = table()[key.split(".", 1)[0]]
    prefix = key + "."
    result = Node({}, resource="." not in key and definition["kind"] == "resource")
    for path, (minimum, maximum, types, _summary, reference) in definition["elements"].items():
        if not path.startswith(prefix) or "." in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        repeating = maximum != "1"
        if maximum == "0":
            continue
        if reference:
            result.rules[name] = Rule(name, name, repeating, COMPLEX, reference)
            names = (name,)
        elif name.endswith("[x]"):
            stem = name[:-3]
            names = ()
            for type_name in types:
                typed = stem + _capitalized(type_name)
                rule = _rule(typed, f"{stem}.ofType({type_name})", repeating, type_name, path, stem)
                result.rules[typed] = rule
                names += (typed, "_" + typed) if rule.kind == PRIMITIVE else (typed,)
            name = stem
        else:
            rule = result.rules[name] = _rule(name, name, repeating, types[0], path, None)
            names = (name, "_" + name) if rule.kind == PRIMITIVE else (name,)
        if minimum >= 1:
            result.required.append((name, names))
    for path, (value_set, codes) in definition.get("codes", {}).items():
        rule = result.rules.get(path[len(prefix):]) if path.startswith(prefix) else None
        if rule is not None and rule.check is not None:
            rule.check = _bound(rule.check, value_set, frozenset(codes))
    for path, (value_set, systems) in definition.get("coded", {}).items():
        rule = result.rules.get(path[len(prefix):]) if path.startswith(prefix) else None
        if rule is not None and rule.kind == COMPLEX:
            codes = {system: frozenset(c) if c is not None else None for system, c in systems.items()}
            rule.binding = Binding(value_set, codes, concept=rule.type == "CodeableConcept")
    if key == "Reference":
        result.rules["reference"].check = _literal_reference
    return result


def _bound(check: primitives.Checker, value_set: str, codes: frozenset[str]) -> primitives.Checker:
    """A code element's check, plus its required binding: the code must be one of the
    value set's (the set R4 lists, see scripts/build_definitions.py `required_codes`)."""

    def bound(value: Any) -> str | None:
        problem = check(value)
        if problem is None and value not in codes:
            shown = ", ".join(sorted(codes)[:12]) + (", ..." if len(codes) > 12 else "")
            return f"{value!r} is not in the required value set {value_set} ({shown})"
        return problem

    return bound


class Binding:
    """The required binding of a Coding or CodeableConcept element to a value set R4
    enumerates (scripts/build_definitions.py `required_concepts`).

    A concept is a (system, code) pair (terminologies.html: coded values are "always
    treated as a pair composed of system and code"), so a Coding is from the value set
    when its system is one the value set includes and its code one of the set's codes in
    that system, compared exactly (the code systems of these value sets are all
    case-sensitive). A Coding without a system, or of another system, is not from the
    set, whatever its code. `version`, `display` and `userSelected` are not compared: R4
    has one version of each of these code systems, and a wrong display does not change
    the concept.

    A CodeableConcept is from the value set when at least one of its codings is: the
    others may be translations into other code systems (datatypes.html#CodeableConcept),
    as HAPI's validator reads a required binding too. One with no coding from the set
    fails, and so does one with only `text`: a required binding leaves no room for a
    concept given as text alone (that is what tells it from an extensible binding, whose
    definition allows "alternate codings (or, data type allowing, text)").

    A value set that is all of UCUM (`ucum-units`) holds every unit UCUM's grammar makes,
    so there a code is checked by parsing it (`terminology.builtin.ucum_valid`).
    """

    __slots__ = ("value_set", "codes", "concept", "listed")

    def __init__(self, value_set: str, codes: dict[str, frozenset[str] | None], concept: bool) -> None:
        self.value_set = value_set
        self.codes = codes  # per system the value set includes: its codes there (None: all of UCUM)
        self.concept = concept  # a CodeableConcept (else a Coding)
        self.listed = "; ".join(
            f"{system}: {', '.join(sorted(c)) if c is not None else 'any valid UCUM unit'}"
            for system, c in sorted(codes.items())
        )

    def includes(self, coding: dict[str, Any]) -> bool:
        """Whether a structurally valid Coding is from the value set."""
        system, code = coding.get("system"), coding.get("code")
        if system not in self.codes:
            return False
        codes = self.codes[system]
        if codes is None:
            return system == UCUM and isinstance(code, str) and ucum_valid(code)
        return code in codes

    def problem(self, value: dict[str, Any]) -> str | None:
        """Why a structurally valid Coding or CodeableConcept is not from the value set
        (valid: every coding is an object, `system` a string, `code` a string)."""
        if not self.concept:
            if self.includes(value):
                return None
            return f"{_shown(value)} is not in the required value set {self.value_set} ({self.listed})"
        codings = value.get("coding")
        if codings is None:
            return (
                f"has no coding, and one from the required value set {self.value_set} ({self.listed}) "
                "is required (text alone does not satisfy a required binding)"
            )
        if any(self.includes(coding) for coding in codings):
            return None
        found = ", ".join(_shown(coding) for coding in codings)
        return f"none of its codings ({found}) is in the required value set {self.value_set} ({self.listed})"


def _shown(coding: dict[str, Any]) -> str:
    system, code = coding.get("system"), coding.get("code")
    shown = repr(code) if code is not None else "no code"
    return f"{system}|{shown}" if system is not None else f"{shown} (no system)"


def _literal_reference(value: Any) -> str | None:
    problem = primitives.checker("string")(value)
    if problem is None and LITERAL_REFERENCE.fullmatch(value) is None:
        return f"{value!r} is not a literal reference (Type/id, #id, urn:uuid:..., an absolute URL)"
    return problem


# Problems of a later FHIR version's content (R5 elements; elements R5 lets repeat), as the
# messages begin: a reader that takes R5 (terminology's inline resources) tells them apart.
UNKNOWN_ELEMENT = "unknown element"
NOT_REPEATING = "must be a single value, not an array"


class Walker:
    """Collects the issues of one resource (and the types of the resources nested in it)."""

    __slots__ = ("issues", "nested_types")

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.nested_types: set[str] = set()

    def problem(self, code: str, path: str, message: str) -> None:
        self.issues.append(Issue(code, f"{path}: {message}", "error", (path,)))

    # --- resources ------------------------------------------------------------------------

    def resource(self, value: Any, path: str) -> None:
        if type(value) is not dict:
            self.problem("structure", path, "must be a JSON object (a resource)")
            return
        resource_type = value.get("resourceType")
        if type(resource_type) is not str:
            self.problem("required", path, "has no resourceType")
        elif resource_type not in resource_types():
            self.problem("value", path, f"{resource_type!r} is not a FHIR R4 resource type")
        else:
            self.object(value, node(resource_type), path, element=False)

    def nested(self, value: Any, path: str) -> None:
        if type(value) is dict and type(value.get("resourceType")) is str:
            self.nested_types.add(value["resourceType"])
        self.resource(value, path)

    # --- objects --------------------------------------------------------------------------

    def object(self, value: Any, of: Node, path: str, element: bool = True) -> None:
        """A resource, datatype or backbone object (`element`: ele-1 applies to it)."""
        if type(value) is not dict:
            shape = "a single object, not an array" if type(value) is list else "a JSON object"
            self.problem("structure", path, f"must be {shape}")
            return
        if element and len(value) <= ("id" in value):
            self.problem("required", path, "must have a value or children besides id (ele-1)")
        rules = of.rules
        chosen: dict[str, str] | None = None
        for name, item in value.items():
            rule = rules.get(name)
            if rule is None:
                rule = self.other(value, of, name, item, path)
                if rule is None:
                    continue
            elif rule.repeating:
                self.array(value, rule, item, path)
            elif rule.kind == PRIMITIVE:
                assert rule.check is not None
                if (problem := rule.check(item)) is not None:
                    if type(item) is list:
                        self.problem("structure", f"{path}.{rule.step}", NOT_REPEATING)
                    else:
                        self.problem("value", f"{path}.{rule.step}", problem)
            elif rule.kind == COMPLEX:
                if rule.binding is None:
                    self.object(item, rule.node(), f"{path}.{rule.step}")
                else:
                    self.bound(item, rule.node(), rule.binding, f"{path}.{rule.step}")
            elif type(item) is list:
                self.problem("structure", f"{path}.{rule.step}", NOT_REPEATING)
            else:
                self.nested(item, f"{path}.{rule.step}")
            if rule.choice is not None:
                if chosen is None:
                    chosen = {}
                other = chosen.setdefault(rule.choice, rule.name)
                if other != rule.name:
                    self.problem(
                        "structure", f"{path}.{rule.choice}",
                        f"has both {other!r} and {rule.name!r}; a choice element takes one type",
                    )
        for step, names in of.required:
            for name in names:
                if name in value:
                    break
            else:
                self.problem("required", f"{path}.{step}", "is required (minimum cardinality 1)")

    def bound(self, value: Any, of: Node, binding: Binding, path: str) -> None:
        """A Coding or CodeableConcept with a required binding. Its value set is consulted
        once its structure is valid: a malformed one is reported as such, not again as
        outside the value set."""
        before = len(self.issues)
        self.object(value, of, path)
        if len(self.issues) == before and (problem := binding.problem(value)) is not None:
            self.problem("value", path, problem)

    def other(self, value: dict[str, Any], of: Node, name: str, item: Any, path: str) -> Rule | None:
        """A property that is not an element: a primitive extension (returns its element's
        rule), the resourceType of a resource, or an unknown element."""
        if name[0] == "_":
            rule = of.rules.get(name[1:])
            if rule is not None and rule.kind == PRIMITIVE:
                self.extensions(value, rule, item, path)
                return rule
        if name != "resourceType" or not of.resource:
            self.problem("structure", f"{path}.{name}", f"{UNKNOWN_ELEMENT} {name!r}")
        return None

    def array(self, value: dict[str, Any], rule: Rule, items: Any, path: str) -> None:
        if type(items) is not list:
            self.problem("structure", f"{path}.{rule.step}", "must be an array")
            return
        if not items:
            self.problem("structure", f"{path}.{rule.step}", "must not be an empty array")
            return
        kind = rule.kind
        if kind == PRIMITIVE:
            check = rule.check
            assert check is not None
            extensions = value.get("_" + rule.name)
            for index, item in enumerate(items):
                if item is None:
                    if not (type(extensions) is list and index < len(extensions) and extensions[index] is not None):
                        self.problem("structure", f"{path}.{rule.step}[{index}]", "is null but has no extension in the _ array")
                elif (problem := check(item)) is not None:
                    self.problem("value", f"{path}.{rule.step}[{index}]", problem)
        elif kind == COMPLEX:
            of = rule.node()
            binding = rule.binding
            for index, item in enumerate(items):
                if binding is None:
                    self.object(item, of, f"{path}.{rule.step}[{index}]")
                else:
                    self.bound(item, of, binding, f"{path}.{rule.step}[{index}]")
        else:
            for index, item in enumerate(items):
                self.nested(item, f"{path}.{rule.step}[{index}]")

    # --- primitive extensions (json.html#primitive) ----------------------------------------

    def extensions(self, value: dict[str, Any], rule: Rule, extension: Any, path: str) -> None:
        """`_name`: the id and extensions of primitive `name`, aligned with its values."""
        where = f"{path}.{rule.step}"
        if rule.type == "xhtml":
            self.problem("structure", where, "xhtml cannot have an id or extensions")
        elif not rule.repeating:
            if type(extension) is list:
                self.problem("structure", where, f"_{rule.name} must be an object, not an array")
            else:
                self.primitive_element(extension, where, value.get(rule.name) is not None)
        elif type(extension) is not list or not extension:
            self.problem("structure", where, f"_{rule.name} must be a non-empty array")
        else:
            values = value.get(rule.name)
            if values is not None and (type(values) is not list or len(values) != len(extension)):
                self.problem("structure", where, f"_{rule.name} must have as many entries as {rule.name}")
                return
            for index, item in enumerate(extension):
                has_value = values is not None and values[index] is not None
                if item is None:
                    if not has_value:
                        self.problem("structure", f"{where}[{index}]", "has neither a value nor an extension")
                else:
                    self.primitive_element(item, f"{where}[{index}]", has_value)

    def primitive_element(self, item: Any, path: str, has_value: bool) -> None:
        if type(item) is not dict or not item:
            self.problem("structure", path, "the _ entry must be a JSON object with an id or extensions")
            return
        if not has_value and "extension" not in item:
            self.problem("required", path, "has neither a value nor an extension (ele-1)")
        self.object(item, node("Element"), path, element=False)


@dataclass(frozen=True, slots=True)
class Result:
    issues: list[Issue]
    nested_types: frozenset[str]  # the types of contained, entry and parameter resources


def validate(resource: dict[str, Any]) -> Result:
    """Validate one resource against R4 (an unknown resourceType is one of the issues)."""
    walker = Walker()
    resource_type = resource.get("resourceType")
    walker.resource(resource, resource_type if type(resource_type) is str else "Resource")
    return Result(walker.issues, frozenset(walker.nested_types))
