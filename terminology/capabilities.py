"""TerminologyCapabilities (`GET /fhir/metadata?mode=terminology`): what this terminology
server can do, with the code systems it holds right now."""

from __future__ import annotations

from typing import Any

from server.store.terminology import TerminologyStore
from terminology.expansion import DEFAULT_LIMIT


async def terminology_capabilities(tstore: TerminologyStore, base: str, date: str) -> dict[str, Any]:
    code_systems = await tstore.code_system_versions()
    return {
        "resourceType": "TerminologyCapabilities",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "Kuroshio"},
        "implementation": {"description": "Kuroshio terminology services", "url": base},
        "lockedDate": False,
        "codeSystem": [
            {"uri": url, **({"version": [{"code": v} for v in versions]} if versions else {})}
            for url, versions in sorted(code_systems.items())
        ],
        "expansion": {
            "hierarchical": False,
            "paging": True,
            "incomplete": False,
            "parameter": [{"name": name} for name in (
                "activeOnly", "count", "offset", "filter", "displayLanguage", "includeDesignations",
                "includeDefinition", "excludeNotForUI", "property",
            )],
            "textFilter": f"Word prefixes over displays and designations; larger than {DEFAULT_LIMIT} codes must be paged",
        },
        "codeSearch": "all",
        "validateCode": {"translations": False},
        "translation": {"needsMap": False},
        "closure": {"translation": True},
    }
