"""Normalization at ingest: add the mapped LOINC / SNOMED CT coding next to a local one.

When an Observation, Condition, Procedure, DiagnosticReport, MedicationRequest, ...
arrives with a coding in a system that a normalization ConceptMap maps to a target system
(LOINC and SNOMED CT by default, `KUROSHIO_TERMINOLOGY_TARGETS`), the target coding is
added to the same CodeableConcept. A ConceptMap is a normalization rule only when it
carries the tag `NORMALIZE_TAG` (the local-table loader sets it; `$meta-add` sets it on
any other): other maps, such as the ones in FHIR packages, never rewrite incoming data. The local coding is kept; the added one is marked
`userSelected: false` and carries the `MAPPED_BY` extension naming the ConceptMap and
its version, so it can be recognised, audited and replaced. Only mappings that say the
codes mean the same (`equivalent`, `equal`) or that the target is wider are applied.

`reapply` runs the same normalization over stored resources after a mapping changed:
codings added earlier are removed and the current mappings applied, and resources that
change are written as new versions through the FHIR API.

The rule set (`RULES`) names, per resource type, the CodeableConcept elements to look
at; search (server/fhir/search) indexes the added codings like any other, which is what
makes `Observation?code=http://loinc.org|4548-4` find locally coded results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.fhir import interactions, jsonio
from server.fhir.outcome import FhirError
from server.store.database import Store
from server.store.fhir import FhirStore
from server.store.terminology import TerminologyStore

MAPPED_BY = "https://kuroshio.dev/fhir/StructureDefinition/mapped-by"
APPLIED = {"equivalent", "equal", "wider", "subsumes"}
DEFAULT_TARGETS = ("http://loinc.org", "http://snomed.info/sct")

# resource type -> paths of CodeableConcepts ("component[].code": every component's code)
RULES: dict[str, tuple[str, ...]] = {
    "Observation": ("code", "component[].code", "valueCodeableConcept"),
    "Condition": ("code",),
    "Procedure": ("code",),
    "DiagnosticReport": ("code",),
    "MedicationRequest": ("medicationCodeableConcept",),
    "MedicationAdministration": ("medicationCodeableConcept",),
    "MedicationStatement": ("medicationCodeableConcept",),
    "AllergyIntolerance": ("code",),
    "Immunization": ("vaccineCode",),
    "ServiceRequest": ("code",),
    "Specimen": ("type",),
}
NORMALIZED_TYPES = tuple(RULES)


def concepts_at(resource: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The CodeableConcepts at a rule path."""
    nodes: list[Any] = [resource]
    for step in path.split("."):
        many = step.endswith("[]")
        name = step.removesuffix("[]")
        found: list[Any] = []
        for node in nodes:
            value = node.get(name) if isinstance(node, dict) else None
            if value is None:
                continue
            found.extend(value if many and isinstance(value, list) else [value])
        nodes = found
    return [n for n in nodes if isinstance(n, dict)]


def well_formed(codings: Any) -> bool:
    """Whether `codings` has the shape normalization reads: a list of objects whose system
    and code are strings and extension a list, where present.

    Incoming hooks run before validation, so a resource may hold anything here: a
    `"coding": 5` or a `"code": ["x"]` raised TypeError (a 500, before the 400 validation
    would have given).
    """
    return isinstance(codings, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("system", ""), str)
        and isinstance(c.get("code", ""), str)
        and isinstance(c.get("extension", []), list)
        for c in codings
    )


def is_added(coding: dict[str, Any]) -> bool:
    return any(e.get("url") == MAPPED_BY for e in coding.get("extension", []) if isinstance(e, dict))


class Normalizer:
    def __init__(self, tstore: TerminologyStore, targets: tuple[str, ...] = DEFAULT_TARGETS) -> None:
        self.tstore = tstore
        self.targets = targets

    def _local(self, coding: dict[str, Any]) -> tuple[str, str] | None:
        """The (system, code) of a coding that a mapping may add to, else None."""
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str) or system in self.targets or is_added(coding):
            return None
        return system, code

    async def _rows(self, concepts: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The normalization rows of every local coding in `concepts`, from one query per
        code system: a transaction Bundle of a patient's record holds hundreds of local
        codings (CVX vaccines, RxNorm drugs), and a query each cost about 5% of its ingest."""
        wanted: dict[str, set[str]] = {}
        for concept in concepts:
            for coding in concept.get("coding", []):
                if (local := self._local(coding)) is not None:
                    wanted.setdefault(local[0], set()).add(local[1])
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        if wanted:
            for row in await self.tstore.normalization_rows(wanted):
                rows.setdefault((row["ss"], row["sc"]), []).append(row)
        return rows

    def _added(self, coding: dict[str, Any], rows: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        local = self._local(coding)
        added = []
        for row in rows.get(local, []) if local is not None else []:
            if row.get("ts") not in self.targets or not row.get("tc") or row.get("eq") not in APPLIED:
                continue
            canonical = f"{row['m']}|{row['mv']}" if row.get("mv") else str(row.get("m"))
            added.append({
                "extension": [{"url": MAPPED_BY, "valueCanonical": canonical}],
                "system": row["ts"],
                "code": row["tc"],
                **({"display": row["td"]} if row.get("td") else {}),
                "userSelected": False,
            })
        return added

    async def normalize(self, *resources: dict[str, Any]) -> bool:
        """Add mapped codings in place (replacing earlier ones); True if anything changed."""
        concepts = [
            concept
            for resource in resources
            for path in RULES.get(str(resource.get("resourceType")), ())
            for concept in concepts_at(resource, path)
            if well_formed(concept.get("coding", []))  # else left as sent, for validation to refuse with a 400
        ]
        rows = await self._rows(concepts)
        changed = False
        for concept in concepts:
            codings = concept.get("coding", [])
            kept = [c for c in codings if not is_added(c)]
            present = {(c.get("system"), c.get("code")) for c in kept}
            new = list(kept)
            for coding in kept:
                for extra in self._added(coding, rows):
                    if (extra["system"], extra["code"]) not in present:
                        present.add((extra["system"], extra["code"]))
                        new.append(extra)
            if new != codings:
                concept["coding"] = new
                changed = True
        return changed


def incoming_hook(normalizer: Normalizer) -> Callable[..., Any]:
    async def normalize(*resources: dict[str, Any]) -> None:
        await normalizer.normalize(*resources)

    return normalize


async def reapply(
    store: Store, types: tuple[str, ...] = NORMALIZED_TYPES, progress: Callable[[int, int | None, str], None] | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> int:
    """Re-normalize stored resources with the current mappings; the number rewritten."""
    tstore = TerminologyStore(store)
    db = FhirStore(store)
    normalizer = Normalizer(tstore, targets)
    changed = 0
    for type_ in types:
        ids = await tstore.current_ids(type_)
        for id_ in ids:
            if progress is not None:
                progress(1, len(ids), f"{type_} resources")
            current = await db.current(type_, id_)
            if current is None or current.body is None:
                continue
            resource = jsonio.loads(current.body)
            if not await normalizer.normalize(resource):
                continue
            try:
                await interactions.update(db, type_, id_, resource, current.version)
            except FhirError:
                continue  # changed meanwhile (412) or no longer valid: the next run sees it again
            changed += 1
    return changed
