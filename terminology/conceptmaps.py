"""ConceptMap rows and ConceptMap/$translate.

A ConceptMap (R4 `equivalence`, or R5 `relationship` as sent by R5 clients) is reduced
to one row per element target, or per element without targets: source system/code,
target system/code, equivalence, dependsOn and product. Rows of stored maps live in
MongoDB (indexed both ways), rows of maps sent with the request in memory; $translate
filters rows the same way for both, forward or `reverse`, and applies `unmapped` rules
when a group has no match.
"""

from __future__ import annotations

from typing import Any

from terminology.context import Context, split_canonical

# R5 relationship -> R4 equivalence (what an R4 client reads)
RELATIONSHIP_TO_EQUIVALENCE = {
    "related-to": "relatedto",
    "equivalent": "equivalent",
    "source-is-narrower-than-target": "wider",
    "source-is-broader-than-target": "narrower",
    "not-related-to": "unmatched",
}
NOT_MATCHES = {"unmatched", "disjoint"}


def _equivalence(target: dict[str, Any]) -> str:
    if "equivalence" in target:
        return str(target["equivalence"])
    return RELATIONSHIP_TO_EQUIVALENCE.get(str(target.get("relationship", "")), "equivalent")


# A ConceptMap tagged so is one of the rules applied at ingest (terminology/normalization.py).
NORMALIZE_TAG = {"system": "https://kuroshio.dev/fhir/CodeSystem/terminology", "code": "normalize-at-ingest"}


def normalizes_at_ingest(conceptmap: dict[str, Any]) -> bool:
    tags = conceptmap.get("meta", {}).get("tag", [])
    return any(
        isinstance(t, dict) and t.get("system") == NORMALIZE_TAG["system"] and t.get("code") == NORMALIZE_TAG["code"]
        for t in tags
    )


def mapping_rows(conceptmap: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (element, target) of the map; elements without targets too. `n` marks
    the rows of maps applied at ingest."""
    url = conceptmap.get("url")
    version = conceptmap.get("version")
    normalize = normalizes_at_ingest(conceptmap)
    rows = []
    for group in conceptmap.get("group", []):
        source, target_system = group.get("source"), group.get("target")
        for element in group.get("element", []):
            base = {
                "m": url, "mv": version, "n": normalize,
                "ss": source, "sv": group.get("sourceVersion"),
                "sc": element.get("code"), "sd": element.get("display"),
                "ts": target_system, "tv": group.get("targetVersion"),
            }
            targets = element.get("target", [])
            if not targets:
                rows.append({**base, "tc": None, "td": None, "eq": "unmatched", "dep": [], "prod": []})
            for target in targets:
                rows.append({
                    **base,
                    "tc": target.get("code"), "td": target.get("display"),
                    "eq": _equivalence(target),
                    "cmt": target.get("comment"),
                    "dep": target.get("dependsOn", []),
                    "prod": target.get("product", []),
                })
    return rows


def _depends_ok(row: dict[str, Any], dependencies: list[dict[str, Any]]) -> bool:
    """Every dependsOn of the mapping must be satisfied by a supplied dependency."""
    for needed in row.get("dep", []):
        prop = needed.get("property") or needed.get("attribute")
        value = needed.get("value") or needed.get("valueCode") or needed.get("valueString")
        if not any(
            (d.get("element") == prop or d.get("property") == prop or d.get("attribute") == prop)
            and (d.get("value") == value or d.get("code") == value)
            for d in dependencies
        ):
            return False
    return True


def _selected(conceptmap_url: str | None, version: str | None, row: dict[str, Any]) -> bool:
    return (conceptmap_url is None or row.get("m") == conceptmap_url) and (version is None or row.get("mv") == version)


async def translate(
    context: Context,
    system: str,
    code: str,
    target_system: str | None,
    reverse: bool,
    conceptmap_url: str | None,
    conceptmap_version: str | None,
    dependencies: list[dict[str, Any]],
    conceptmaps: list[dict[str, Any]],
) -> dict[str, Any]:
    """Parameters with `result`, `message` and one `match` per mapping found."""
    if conceptmap_url and "|" in conceptmap_url:
        conceptmap_url, conceptmap_version = split_canonical(conceptmap_url)
    rows: list[dict[str, Any]] = []
    for cm in conceptmaps:
        rows.extend(mapping_rows(cm))
    local_maps = {(cm.get("url"), cm.get("version")) for cm in conceptmaps}
    if context.store is not None:
        stored = await (context.store.mappings_to(system, code) if reverse else context.store.mappings_from(system, code))
        rows.extend(r for r in stored if (r.get("m"), r.get("mv")) not in local_maps)
    matches: list[dict[str, Any]] = []
    for row in rows:
        if not _selected(conceptmap_url, conceptmap_version, row):
            continue
        if reverse:
            if row.get("ts") != system or row.get("tc") != code:
                continue
            if target_system and row.get("ss") != target_system:
                continue
        else:
            if row.get("ss") != system or row.get("sc") != code:
                continue
            if target_system and row.get("ts") != target_system:
                continue
        if not _depends_ok(row, dependencies):
            continue
        matches.append(_match(row, reverse))
    if not matches and not reverse:
        matches.extend(await _unmapped(context, system, code, target_system, conceptmap_url, conceptmaps))
    result = any(_is_match(m) for m in matches)
    parameters: list[dict[str, Any]] = [{"name": "result", "valueBoolean": result}]
    if not result:
        parameters.append({"name": "message", "valueString": f"No mappings could be found for {system}#{code}"})
    parameters.extend(matches)
    return {"resourceType": "Parameters", "parameter": parameters}


def _is_match(match: dict[str, Any]) -> bool:
    return not any(p["name"] == "equivalence" and p.get("valueCode") in NOT_MATCHES for p in match["part"])


def _canonical(row: dict[str, Any]) -> str:
    return f"{row['m']}|{row['mv']}" if row.get("mv") else str(row.get("m"))


def _match(row: dict[str, Any], reverse: bool) -> dict[str, Any]:
    """One `match`: in reverse, `concept` is the target asked about and `source` the code found."""
    target = {"system": row.get("ts"), "code": row.get("tc"), "display": row.get("td")}
    parts: list[dict[str, Any]] = [{"name": "equivalence", "valueCode": row.get("eq", "equivalent")}]
    if target.get("code") is not None:
        parts.append({"name": "concept", "valueCoding": {k: v for k, v in target.items() if v is not None}})
    for product in row.get("prod", []):
        product_parts = [{"name": "element", "valueUri": product.get("property") or product.get("attribute")}]
        if product.get("system") or product.get("value"):
            product_parts.append({"name": "concept", "valueCoding": {"system": product.get("system"), "code": product.get("value")}})
        parts.append({"name": "product", "part": product_parts})
    if row.get("m"):
        parts.append({"name": "originMap", "valueCanonical": _canonical(row)})
    if reverse:
        source = {"system": row.get("ss"), "code": row.get("sc"), "display": row.get("sd")}
        parts.append({"name": "source", "valueCoding": {k: v for k, v in source.items() if v is not None}})
    return {"name": "match", "part": parts}


async def _unmapped(
    context: Context, system: str, code: str, target_system: str | None, conceptmap_url: str | None, conceptmaps: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Apply group.unmapped (fixed code, or provided = the source code itself)."""
    maps = list(conceptmaps)
    if conceptmap_url and not any(cm.get("url") == conceptmap_url for cm in maps):
        cm = await context.resource("ConceptMap", conceptmap_url)
        if cm is not None:
            maps.append(cm)
    found = []
    for cm in maps:
        if conceptmap_url and cm.get("url") != conceptmap_url:
            continue
        for group in cm.get("group", []):
            unmapped = group.get("unmapped")
            if not unmapped or group.get("source") != system:
                continue
            if target_system and group.get("target") != target_system:
                continue
            mode = unmapped.get("mode")
            row = {"m": cm.get("url"), "mv": cm.get("version"), "ss": system, "sc": code, "ts": group.get("target"),
                   "eq": unmapped.get("equivalence") or RELATIONSHIP_TO_EQUIVALENCE.get(unmapped.get("relationship", ""), "inexact")}
            if mode == "fixed":
                row.update(tc=unmapped.get("code"), td=unmapped.get("display"))
            elif mode == "provided":
                row.update(tc=code, ts=system)
            else:
                continue
            found.append(_match(row, False))
    return found
