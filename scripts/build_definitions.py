"""Regenerate the R4 definition tables shipped in server/fhir/definitions/.

The server needs a few facts from the FHIR R4 specification at run time (the resource
types, the element structure, the search parameters and the compartments). They come from the
official definitions in the npm package `hl7.fhir.r4.examples` (CC0), reduced to compact
tables and committed, so the running server does not depend on the package.

    npm pack hl7.fhir.r4.examples@4.0.1 && tar xzf hl7.fhir.r4.examples-4.0.1.tgz
    python scripts/build_definitions.py package/
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

from server.fhir.search.fhirpath import expression_for_base, split_union
from terminology.builtin import UCUM

OUT = Path(__file__).resolve().parent.parent / "server" / "fhir" / "definitions"


def structure_definitions(package: Path) -> list[dict]:
    return [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(package.glob("StructureDefinition-*.json"))
    ]


def resource_types(definitions: list[dict]) -> list[str]:
    return sorted(
        d["type"]
        for d in definitions
        if d.get("kind") == "resource"
        and d.get("derivation") == "specialization"
        and not d.get("abstract")
    )


FHIR_TYPE = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX = "http://hl7.org/fhir/StructureDefinition/regex"


def type_code(element_type: dict) -> str:
    """The FHIR type of an element; System.* codes carry it in an extension."""
    for ext in element_type.get("extension", []):
        if ext.get("url") == FHIR_TYPE:
            return ext["valueUrl"]
    return element_type["code"].rsplit(".", 1)[-1].lower() if element_type["code"].startswith(
        "http://hl7.org/fhirpath/System."
    ) else element_type["code"]


def narrative_allowlists(definitions: list[dict]) -> dict[str, list[str]]:
    """The XHTML elements and attributes a narrative may use: the lists in the xpath of
    R4's txt-1 constraint on Narrative.div (its FHIRPath is an opaque htmlChecks())."""
    narrative = next(d for d in definitions if d["id"] == "Narrative")
    div = next(e for e in narrative["snapshot"]["element"] if e["path"] == "Narrative.div")
    xpath = next(c["xpath"] for c in div["constraint"] if c["key"] == "txt-1")
    elements, attributes = re.findall(r"name\(\.\)=\(([^)]*)\)", xpath)
    return {
        "elements": re.findall(r"'([^']+)'", elements),
        "attributes": re.findall(r"'([^']+)'", attributes),
    }


def element_types(definition: dict, element: dict) -> list[str]:
    """The element's types. A resource's own `id` is the `id` datatype (resource.html#id,
    and fhir.schema.json), though R4's snapshots give it as System.String with the
    fhir-type `string`, like the unrestricted `Element.id` of every other element."""
    if definition["kind"] == "resource" and element["path"] == definition["type"] + ".id":
        return ["id"]
    return [type_code(t) for t in element.get("type", [])]


def _concepts(concepts: list[dict], parents: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """(code, its ancestors) of every concept of a code system, nested ones included."""
    found = []
    for concept in concepts:
        found.append((concept["code"], parents))
        found += _concepts(concept.get("concept", []), parents + (concept["code"],))
    return found


class ValueSets:
    """The concepts of R4's value sets, from the package's ValueSet and CodeSystem
    resources, where they can be listed: explicit concepts, whole code systems of
    `complete` content, `is-a` / `descendent-of` filters, included value sets and
    excludes. Anything else (a code system the package only names, such as BCP-13 media
    types, ISO 4217 currencies, UCUM or LOINC, or another filter) gives None: its
    concepts cannot be listed here. A concept is a (system, code) pair; versions are not
    told apart (every code system of the package has one version, R4's own)."""

    def __init__(self, package: Path) -> None:
        self.code_systems = self._by_url(package, "CodeSystem")
        self.value_sets = self._by_url(package, "ValueSet")

    @staticmethod
    def _by_url(package: Path, kind: str) -> dict[str, dict]:
        resources = (json.loads(p.read_text(encoding="utf-8")) for p in sorted(package.glob(f"{kind}-*.json")))
        return {r["url"]: r for r in resources if "url" in r}

    def codes(self, url: str) -> set[str] | None:
        """The codes of the value set, whatever their system (for `code` elements)."""
        concepts = self.concepts(url)
        return None if concepts is None else {code for _system, code in concepts}

    def concepts(self, url: str, seen: tuple[str, ...] = ()) -> set[tuple[str, str]] | None:
        """The (system, code) pairs of the value set."""
        value_set = self.value_sets.get(url)
        if url in seen or value_set is None or "compose" not in value_set:
            return None
        concepts: set[tuple[str, str]] = set()
        for rule, add in [(r, True) for r in value_set["compose"].get("include", [])] + [
            (r, False) for r in value_set["compose"].get("exclude", [])
        ]:
            selected = self._selected(rule, seen + (url,))
            if selected is None:
                return None
            concepts = concepts | selected if add else concepts - selected
        return concepts

    def _selected(self, rule: dict, seen: tuple[str, ...]) -> set[tuple[str, str]] | None:
        sets = []
        system = rule.get("system")
        if "concept" in rule:
            sets.append({(system, c["code"]) for c in rule["concept"]})
        elif system is not None:
            code_system = self.code_systems.get(system)
            if code_system is None or code_system.get("content") != "complete":
                return None
            concepts = _concepts(code_system.get("concept", []))
            codes = {code for code, _ in concepts}
            for f in rule.get("filter", []):
                if f["property"] != "concept" or f["op"] not in ("is-a", "descendent-of"):
                    return None
                codes &= {c for c, ancestors in concepts if f["value"] in ancestors or (f["op"] == "is-a" and c == f["value"])}
            sets.append({(system, code) for code in codes})
        for url in rule.get("valueSet", []):
            included = self.concepts(url.split("|")[0], seen)
            if included is None:
                return None
            sets.append(included)
        return set.intersection(*sets) if sets else None


def _required_bindings(definition: dict) -> list[tuple[str, list[str], str]]:
    """(path, types, value set URL) of each element with a required binding."""
    return [
        (e["path"], element_types(definition, e), e["binding"]["valueSet"].split("|")[0])
        for e in definition["snapshot"]["element"]
        if e.get("binding", {}).get("strength") == "required"
    ]


def required_codes(definition: dict, value_sets: ValueSets) -> dict[str, list]:
    """Per `code` element with a required binding whose codes can be listed: [the value
    set's URL, its codes]. The validator refuses other codes there."""
    table = {}
    for path, types, url in _required_bindings(definition):
        if types == ["code"] and (codes := value_sets.codes(url)) is not None:
            table[path] = [url, sorted(codes)]
    return table


def required_concepts(definition: dict, value_sets: ValueSets) -> dict[str, list]:
    """Per Coding or CodeableConcept element with a required binding whose concepts can be
    listed: [the value set's URL, {system: its codes in that system}]. The validator
    refuses a Coding, or a CodeableConcept none of whose codings, is one of them. A value
    set that is all of UCUM gives {UCUM: None}: a unit is in it when it parses by UCUM's
    grammar, which the validator checks (UCUM's units are made by a grammar, not listed).

    R4 binds 14 such elements, all CodeableConcepts: 10 to listed value sets, 3 to
    `ucum-units` (EffectEvidenceSynthesis.effectEstimate.unitOfMeasure,
    ResearchElementDefinition.characteristic.unitOfMeasure,
    RiskEvidenceSynthesis.riskEstimate.unitOfMeasure), and one is not checked: LOINC
    answer list `LL379-9` (MolecularSequence.structureVariant.variantType; LOINC is not in
    the package)."""
    table = {}
    for path, types, url in _required_bindings(definition):
        if types not in (["Coding"], ["CodeableConcept"]):
            continue
        if _all_of(value_sets.value_sets.get(url), UCUM):
            table[path] = [url, {UCUM: None}]
        elif (concepts := value_sets.concepts(url)) is not None:
            systems: dict[str, list[str]] = {}
            for system, code in sorted(concepts):
                systems.setdefault(system, []).append(code)
            table[path] = [url, systems]
    return table



def _all_of(value_set: dict | None, system: str) -> bool:
    """Whether the value set is every code of `system` (one include naming only it)."""
    compose = (value_set or {}).get("compose", {})
    return compose.get("include") == [{"system": system}] and not compose.get("exclude")


def structure(definitions: list[dict], value_sets: ValueSets) -> dict[str, dict]:
    """Per base type: its kind and, per element path, [min, max, types, summary, ref];
    `codes`: the required bindings of its code elements (see `required_codes`); `coded`:
    those of its Coding and CodeableConcept elements (see `required_concepts`)."""
    table: dict[str, dict] = {}
    for d in definitions:
        if d.get("derivation") == "constraint" or d.get("kind") == "logical":
            continue
        elements: dict[str, list] = {}
        regex = None
        for e in d["snapshot"]["element"]:
            if "." not in e["path"]:
                continue
            types = element_types(d, e)
            ref = e.get("contentReference", "").lstrip("#") or None
            elements[e["path"]] = [e["min"], e["max"], types, bool(e.get("isSummary")), ref]
            if d["kind"] == "primitive-type" and e["path"].endswith(".value"):
                for t in e.get("type", []):
                    for ext in t.get("extension", []):
                        if ext.get("url") == REGEX:
                            regex = ext["valueString"]
        entry: dict = {"kind": d["kind"], "abstract": bool(d.get("abstract")), "elements": elements}
        if d.get("baseDefinition"):
            entry["base"] = d["baseDefinition"].rsplit("/", 1)[-1]
        if regex:
            entry["regex"] = regex
        if codes := required_codes(d, value_sets):
            entry["codes"] = codes
        if coded := required_concepts(d, value_sets):
            entry["coded"] = coded
        table[d["type"]] = entry
    return table


# Errata of the R4 definitions, as corrected in R4B: DocumentReference-relationship names
# its components in the wrong order (the reference parameter on `code`, the token on
# `target`), which would index relation codes as references and targets as tokens.
_COMPONENT_ERRATA = {
    "http://hl7.org/fhir/SearchParameter/DocumentReference-relationship": [
        {"definition": "http://hl7.org/fhir/SearchParameter/DocumentReference-relation", "expression": "code"},
        {"definition": "http://hl7.org/fhir/SearchParameter/DocumentReference-relatesto", "expression": "target"},
    ],
}


def search_parameters(package: Path) -> list[dict]:
    """Every R4 SearchParameter, with its expression split per base resource type."""
    bundle = json.loads((package / "Bundle-searchParams.json").read_text(encoding="utf-8"))
    parameters = []
    for entry in bundle["entry"]:
        d = entry["resource"]
        fragments = split_union(d.get("expression") or "")
        expressions = {base: expression_for_base(fragments, base) for base in d["base"]}
        row = {
            "url": d["url"],
            "code": d["code"],
            "type": d["type"],
            "base": d["base"],
            "expression": expressions,
            "target": d.get("target", []),
            "multipleOr": d.get("multipleOr", True),
            "multipleAnd": d.get("multipleAnd", True),
        }
        components = _COMPONENT_ERRATA.get(d["url"], d.get("component"))
        if components:
            row["component"] = [
                {"definition": c["definition"], "expression": c["expression"]} for c in components
            ]
        parameters.append(row)
    return parameters


def compartments(package: Path) -> dict[str, dict[str, list[str]]]:
    """Per compartment (Patient, Encounter, ...): resource type -> the parameters linking it."""
    table = {}
    for path in sorted(package.glob("CompartmentDefinition-*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        if d["id"] == "example":
            continue
        table[d["code"]] = {r["code"]: r["param"] for r in d.get("resource", []) if r.get("param")}
    return table


def _write_gzip(path: Path, data: object) -> None:
    """Compact JSON, gzipped with no time stamp nor file name in the header: the same
    definitions give the same bytes, so a rebuild shows no false diff."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))


def main(package: Path) -> None:
    definitions = structure_definitions(package)
    types = resource_types(definitions)
    (OUT / "resource-types.json").write_text(json.dumps(types, indent=0) + "\n")
    print(f"{len(types)} resource types")
    table = structure(definitions, ValueSets(package))
    table["xhtml"]["narrative"] = narrative_allowlists(definitions)
    _write_gzip(OUT / "structure.json.gz", table)
    print(f"{len(table)} structure definitions")
    parameters = search_parameters(package)
    _write_gzip(OUT / "search-parameters.json.gz", parameters)
    print(f"{len(parameters)} search parameters")
    compartment_table = compartments(package)
    (OUT / "compartments.json").write_text(json.dumps(compartment_table, indent=0, sort_keys=True) + "\n")
    print(f"{len(compartment_table)} compartments")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
