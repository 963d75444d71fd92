"""$closure: client-maintained transitive closure tables (FHIR R4 terminology service).

A client names a table and sends the concepts it has met; the server answers, as a
ConceptMap, the subsumption links between the new concepts and those already in the
table (source = the more specific concept, target = the one that subsumes it, with
equivalence `subsumes`), and numbers each answer with the table's version, so that a
client can ask again for everything after a version. The table lives in MongoDB and
is updated in one transaction, so concurrent callers never lose a concept.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from server.store.database import Store
from server.store.terminology import TerminologyStore
from terminology.context import Context
from terminology.outcomes import tx_error


def _concept_map(name: str, version: int, rows: list[list[Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for _, system, child, parent in rows:
        group = groups.setdefault(system, {"source": system, "target": system, "element": []})
        group["element"].append({"code": child, "target": [{"code": parent, "equivalence": "subsumes"}]})
    return {
        "resourceType": "ConceptMap",
        "name": name,
        "version": str(version),
        "status": "active",
        "group": list(groups.values()),
    }


async def closure(store: Store, context: Context, name: str, concepts: list[dict[str, Any]], since: int | None) -> dict[str, Any]:
    """Add concepts to the table `name` (or reset it when none are given) and answer the links."""
    tstore = TerminologyStore(store)
    resolved = []
    for coding in concepts:
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            raise tx_error(400, "invalid", "Each concept needs a system and a code", "invalid-data")
        cs = await context.code_system(system, coding.get("version"))
        concept = await cs.find(code) if cs is not None else None
        if concept is None:
            raise tx_error(404, "not-found", f"Unknown code '{system}#{code}'", "invalid-code")
        resolved.append((system, concept.code, set(concept.ancestors)))

    async def body(session: AsyncClientSession) -> dict[str, Any]:
        table = await tstore.closure(session, name)
        if not concepts and since is None:
            await tstore.put_closure(session, name, {"v": 0, "concepts": [], "rows": []})
            return _concept_map(name, 0, [])
        if table is None:
            raise tx_error(404, "not-found", f"The closure table '{name}' has not been initialised", "not-found")
        if since is not None:
            return _concept_map(name, table["v"], [r for r in table["rows"] if r[0] > since])
        version = table["v"] + 1
        known = [(s, c, set(a)) for s, c, a in table["concepts"]]
        added: list[list[Any]] = []
        for system, code, ancestors in resolved:
            if any(s == system and c == code for s, c, _ in known):
                continue
            for other_system, other, other_ancestors in known:
                if other_system != system:
                    continue
                if other in ancestors:
                    added.append([version, system, code, other])
                elif code in other_ancestors:
                    added.append([version, system, other, code])
            known.append((system, code, ancestors))
        await tstore.put_closure(session, name, {
            "v": version,
            "concepts": [[s, c, sorted(a)] for s, c, a in known],
            "rows": table["rows"] + added,
        })
        return _concept_map(name, version, added)

    return await store.transaction(body)
