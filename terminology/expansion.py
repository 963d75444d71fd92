"""ValueSet/$expand: the codes a value set's compose selects, as a (paged) expansion.

Includes are unioned and excludes subtracted; an include with `valueSet` entries is
intersected with those value sets (expanded recursively, cycles reported). Filters,
the `filter` text and `activeOnly` become index queries for stored code systems, so a
value set over a single large system is paged in MongoDB (`count`/`offset`) rather
than built in memory; other expansions are built in memory up to a limit, beyond which
the client is told to page (too-costly) instead of the server being exhausted.
Membership (`contains`) answers $validate-code without expanding at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.store.terminology import ConceptCriteria
from terminology.codesystems import CodeSystemVersion, criteria_accepts
from terminology.concepts import Concept, words
from terminology.context import Context, split_canonical
from terminology.filters import compile_filters
from terminology.languages import display_for, language_matches, preferred
from terminology.outcomes import tx_error

DEFAULT_LIMIT = 1000
ECHOED = (
    "activeOnly", "count", "designation", "displayLanguage", "excludeNested", "excludeNotForUI",
    "excludePostCoordinated", "filter", "includeDesignations", "offset",
)
CONCEPT_PROPERTIES = "http://hl7.org/fhir/concept-properties#"
VALUESET_DEPRECATED = "http://hl7.org/fhir/StructureDefinition/valueset-deprecated"


# What an expansion repeats of its value set (the definition itself is not needed to use it).
SUMMARY = ("resourceType", "language", "extension", "url", "version", "name", "title", "status", "experimental")


@dataclass
class ExpandOptions:
    count: int | None = None
    offset: int = 0
    filter: str | None = None
    active_only: bool = False
    exclude_not_for_ui: bool = False
    include_designations: bool = False
    languages: list[str] = field(default_factory=list)
    designation_languages: list[str] = field(default_factory=list)  # `designation` parameters
    properties: list[str] = field(default_factory=list)
    offset_given: bool = False
    limit: int = DEFAULT_LIMIT
    echo: list[dict[str, Any]] = field(default_factory=list)  # parameters to report


@dataclass
class Entry:
    cs: CodeSystemVersion
    concept: Concept
    display: str | None = None  # a display given by the value set itself
    designations: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)  # the value set's, on this concept

    @property
    def key(self) -> tuple[str, str]:
        return self.cs.url, self.concept.code


@dataclass
class Collected:
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    used: dict[str, None] = field(default_factory=dict)  # used-codesystem values
    total: int | None = None  # set when paging happened in the store


def _canonical(vs: dict[str, Any]) -> str:
    url = vs.get("url", "")
    return f"{url}|{vs['version']}" if vs.get("version") else url


class Expander:
    def __init__(self, context: Context, options: ExpandOptions) -> None:
        self.context = context
        self.options = options
        self.used_value_sets: dict[str, None] = {}

    async def code_system(self, system: str, version: str | None) -> CodeSystemVersion:
        cs = await self.context.code_system(system, version)
        if cs is None:
            if version is not None and await self.context.code_system(system):
                raise tx_error(
                    404, "not-found",
                    f"A definition for CodeSystem '{system}' version '{version}' could not be found, so the value set cannot be expanded",
                    "not-found",
                )
            raise tx_error(
                404, "not-found",
                f"A definition for CodeSystem '{system}' could not be found, so the value set cannot be expanded",
                "not-found",
            )
        return cs

    async def value_set(self, reference: str) -> dict[str, Any]:
        vs = await self.context.resource("ValueSet", reference)
        if vs is None:
            raise tx_error(
                404, "not-found",
                f"A definition for the value Set '{reference}' could not be found", "not-found",
            )
        self.used_value_sets[_canonical(vs)] = None
        return vs

    def base_criteria(self) -> ConceptCriteria:
        criteria = ConceptCriteria(active_only=self.options.active_only)
        if self.options.filter:
            criteria.word_prefixes = words(self.options.filter)
        return criteria

    async def include(
        self, include: dict[str, Any], stack: tuple[str, ...], page: tuple[int, int] | None = None
    ) -> Collected:
        """The codes one include (or exclude) selects."""
        collected = Collected()
        restrict: list[Collected] = []
        for reference in include.get("valueSet", []):
            vs = await self.value_set(reference)
            canonical = _canonical(vs)
            if canonical in stack or vs.get("url") in [split_canonical(s)[0] for s in stack]:
                chain = ", ".join([*stack[1:], canonical])
                raise tx_error(
                    400, "processing",
                    f"Cyclic reference detected when excluding {stack[0]} via [{chain}]",
                    "vs-invalid",
                    diagnostics=f"Cyclic reference detected when excluding {stack[0]} via [{chain}]",
                )
            restrict.append(await self.compose(vs, (*stack, canonical)))
        system = include.get("system")
        if system is None:
            if restrict:
                first, *others = restrict
                for key, entry in first.entries.items():
                    if all(key in o.entries for o in others):
                        collected.entries[key] = entry
                for r in restrict:
                    collected.used.update(r.used)
            return collected
        cs = await self.code_system(system, include.get("version"))
        collected.used[cs.versioned()] = None
        criteria = self.base_criteria()
        if include.get("concept"):
            wanted = include["concept"]
            found = {c.code: c for c in await cs.source.select(ConceptCriteria(codes=[c.get("code") for c in wanted]), [])}
            for item in wanted:
                concept = found.get(item.get("code"))
                if concept is None and not cs.case_sensitive:
                    concept = await cs.find(item.get("code", ""))
                if concept is None and cs.content != "complete" and isinstance(item.get("code"), str):
                    # a fragment (a LOINC subset, say) does not hold every code of its
                    # system: a code the value set names is taken as named, not dropped
                    concept = Concept(item["code"], item.get("display"))
                if concept is None or not criteria_accepts(criteria, _with_designations(concept, item)):
                    continue
                entry = Entry(cs, concept, item.get("display"), item.get("designation", []), item.get("extension", []))
                collected.entries[entry.key] = entry
        else:
            selection = await compile_filters(cs, include.get("filter", []))
            _merge(selection.criteria, criteria)
            if page is not None and not restrict:
                skip, limit = page
                collected.total = await cs.source.count(selection.criteria, selection.tests)
                concepts = await cs.source.select(selection.criteria, selection.tests, skip, limit) if limit else []
            else:
                concepts = await cs.source.select(selection.criteria, selection.tests)
            for concept in concepts:
                collected.entries[(cs.url, concept.code)] = Entry(cs, concept)
        for r in restrict:
            collected.entries = {k: e for k, e in collected.entries.items() if k in r.entries}
            collected.used.update(r.used)
        return collected

    async def compose(self, vs: dict[str, Any], stack: tuple[str, ...]) -> Collected:
        compose = vs.get("compose") or {}
        includes = compose.get("include", [])
        excludes = compose.get("exclude", [])
        if not compose and "expansion" in vs:
            return await self.from_expansion(vs)
        page = None
        if (
            len(includes) == 1 and not excludes and includes[0].get("system")
            and not includes[0].get("concept") and not includes[0].get("valueSet")
            and self.options.count is not None and not self.options.exclude_not_for_ui
            and len(stack) == 1
        ):
            page = (self.options.offset, self.options.count)
        result = Collected()
        for include in includes:
            part = await self.include(include, stack, page)
            result.entries.update(part.entries)
            result.used.update(part.used)
            result.total = part.total
        for exclude in excludes:
            part = await self.include(exclude, stack)
            for key in part.entries:
                result.entries.pop(key, None)
        if self.options.exclude_not_for_ui:
            result.entries = {k: e for k, e in result.entries.items() if not e.concept.abstract}
        return result

    async def from_expansion(self, vs: dict[str, Any]) -> Collected:
        """A value set that only carries an expansion (no compose): take its codes."""
        result = Collected()
        for item in _flatten_contains(vs.get("expansion", {}).get("contains", [])):
            system, code = item.get("system"), item.get("code")
            if not system or not code:
                continue
            cs = await self.context.code_system(system, item.get("version"))
            concept = (await cs.find(code) if cs else None) or Concept(code, item.get("display"))
            holder = cs or CodeSystemVersion({"url": system, "version": item.get("version")}, _NoConcepts())
            result.entries[(system, code)] = Entry(holder, concept, item.get("display"))
        return result


class _NoConcepts:
    async def get(self, code: str) -> Concept | None:
        return None

    async def get_ignoring_case(self, code: str) -> Concept | None:
        return None

    async def select(self, criteria: ConceptCriteria, tests: list[Callable[[Concept], bool]], skip: int = 0, limit: int = 0) -> list[Concept]:
        return []

    async def count(self, criteria: ConceptCriteria, tests: list[Callable[[Concept], bool]]) -> int:
        return 0


def _flatten_contains(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        out.append(item)
        out.extend(_flatten_contains(item.get("contains", [])))
    return out


def _with_designations(concept: Concept, item: dict[str, Any]) -> Concept:
    if not item.get("designation") and not item.get("display"):
        return concept
    extra = list(item.get("designation", []))
    if item.get("display"):
        extra.append({"value": item["display"]})
    return Concept(concept.code, concept.display, designations=[*concept.designations, *extra], inactive=concept.inactive)


def _merge(into: ConceptCriteria, base: ConceptCriteria) -> None:
    into.active_only = into.active_only or base.active_only
    into.word_prefixes = [*into.word_prefixes, *base.word_prefixes]


async def expand(context: Context, vs: dict[str, Any], options: ExpandOptions) -> dict[str, Any]:
    """The value set with its `expansion` (R4 form; R5-only elements as extensions)."""
    expander = Expander(context, options)
    collected = await expander.compose(vs, (_canonical(vs),))
    entries = list(collected.entries.values())
    if collected.total is not None:
        total = collected.total
        page = entries
    else:
        total = len(entries)
        if options.count is None and total > options.limit:
            raise tx_error(
                422, "too-costly",
                f"The value set '{_canonical(vs)}' expansion has too many codes to display (>{options.limit})",
                diagnostics=f"{total} codes; ask for a page with count and offset",
            )
        start = options.offset
        page = entries[start : start + options.count] if options.count is not None else entries[start:]
    expansion: dict[str, Any] = {
        "identifier": f"urn:uuid:{uuid.uuid4()}",
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "total": total,
    }
    if options.offset_given:
        expansion["offset"] = options.offset
    parameters = list(options.echo)
    parameters += [{"name": "used-codesystem", "valueUri": u} for u in collected.used]
    parameters += [{"name": "used-valueset", "valueUri": u} for u in expander.used_value_sets]
    parameters += [
        {"name": "used-supplement", "valueUri": f"{s['url']}|{s['version']}" if s.get("version") else s["url"]}
        for s in context.supplements
    ]
    parameters += [{"name": f"warning-{status}", "valueUri": canonical} for canonical, (_, status) in context.notes.items()]
    if parameters:
        expansion["parameter"] = parameters
    contains = [contains_entry(e, options) for e in page]
    if options.properties:
        uris = {}
        for entry in entries:
            for prop in entry.cs.resource.get("property", []):
                uris.setdefault(prop.get("code"), prop.get("uri"))
        expansion["extension"] = [
            {
                "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-ValueSet.expansion.property",
                "extension": [
                    {"url": "code", "valueCode": p},
                    {"url": "uri", "valueUri": uris.get(p) or CONCEPT_PROPERTIES + p},
                ],
            }
            for p in options.properties
        ]
    if contains:
        expansion["contains"] = contains
    result = {k: v for k, v in vs.items() if k in SUMMARY}
    result["expansion"] = expansion
    return result


def contains_entry(entry: Entry, options: ExpandOptions) -> dict[str, Any]:
    concept = entry.concept
    item: dict[str, Any] = {"system": entry.cs.url}
    if concept.abstract:
        item["abstract"] = True
    if concept.inactive:
        item["inactive"] = True
    item["code"] = concept.code
    display = entry.display or display_for(entry.cs, concept, options.languages)
    if display:
        item["display"] = display
    if options.include_designations:
        designations = [*concept.designations, *entry.designations]
        if display != concept.display and concept.display:
            designations = [preferred(entry.cs, concept.display)] + [d for d in designations if d.get("value") != display]
        if options.designation_languages:
            designations = [
                d for d in designations
                if any(language_matches(lang, d.get("language")) for lang in options.designation_languages)
            ]
        if designations:
            item["designation"] = designations
    extensions = [
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-ValueSet.expansion.contains.property",
            "extension": [{"url": "code", "valueCode": code}, {"url": "value", **value}],
        }
        for code in options.properties
        for value in property_values(concept, code)
    ]
    extensions += [e for e in entry.extensions if e.get("url") == VALUESET_DEPRECATED]
    if extensions:
        item["extension"] = extensions
    return item


async def check_imports(context: Context, vs: dict[str, Any], stack: tuple[str, ...] = ()) -> None:
    """Refuse a value set whose includes/excludes import it again (directly or not)."""
    canonical = _canonical(vs)
    stack = stack or (canonical,)
    compose = vs.get("compose") or {}
    for part in [*compose.get("include", []), *compose.get("exclude", [])]:
        for reference in part.get("valueSet", []):
            inner = await context.resource("ValueSet", reference)
            if inner is None:
                continue
            inner_canonical = _canonical(inner)
            if inner_canonical in stack:
                chain = ", ".join([*stack[1:], inner_canonical])
                message = f"Cyclic reference detected when excluding {stack[0]} via [{chain}]"
                raise tx_error(400, "processing", message, "vs-invalid", diagnostics=message)
            await check_imports(context, inner, (*stack, inner_canonical))


async def contains(
    context: Context, vs: dict[str, Any], cs: CodeSystemVersion, concept: Concept, stack: tuple[str, ...] = ()
) -> bool | None:
    """Whether the value set contains this concept; None when it cannot tell.

    Evaluated include by include on the one concept, so membership in a value set over a
    large code system costs a few index lookups, never an expansion.
    """
    canonical = _canonical(vs)
    if canonical in stack:
        raise tx_error(400, "processing", f"Cyclic reference detected in {canonical}", "vs-invalid")
    stack = (*stack, canonical)
    compose = vs.get("compose") or {}
    if not compose and "expansion" in vs:
        return any(
            i.get("system") == cs.url and i.get("code") == concept.code
            for i in _flatten_contains(vs["expansion"].get("contains", []))
        )
    async def selected(include: dict[str, Any]) -> bool:
        system = include.get("system")
        if system is not None:
            if system != cs.url:
                return False
            if include.get("version") and cs.version and include["version"] != cs.version:
                return False
            if include.get("concept"):
                codes = [c.get("code") for c in include["concept"]]
                if concept.code not in codes and (cs.case_sensitive or concept.code.lower() not in [str(c).lower() for c in codes]):
                    return False
            else:
                selection = await compile_filters(cs, include.get("filter", []))
                if not criteria_accepts(selection.criteria, concept) or not all(t(concept) for t in selection.tests):
                    return False
        for reference in include.get("valueSet", []):
            inner = await context.resource("ValueSet", reference)
            if inner is None:
                raise tx_error(
                    404, "not-found",
                    f"A definition for the value Set '{reference}' could not be found", "not-found",
                )
            if not await contains(context, inner, cs, concept, stack):
                return False
        return True

    included = False
    for include in compose.get("include", []):
        if await selected(include):
            included = True
            break
    if not included:
        return False
    for exclude in compose.get("exclude", []):
        if await selected(exclude):
            return False
    return True


def property_values(concept: Concept, code: str) -> list[dict[str, Any]]:
    """A concept's values for a property, including the ones every concept has."""
    if code == "definition":
        return [{"valueString": concept.definition}] if concept.definition else []
    if code == "display":
        return [{"valueString": concept.display}] if concept.display else []
    if code == "inactive":
        return [{"valueBoolean": concept.inactive}]
    if code == "parent":
        return [{"valueCode": p} for p in concept.parents]
    return [
        {k: v for k, v in p.items() if k.startswith("value")}
        for p in concept.properties
        if p.get("code") == code
    ]
