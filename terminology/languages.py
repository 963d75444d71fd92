"""Display languages: `displayLanguage`, Accept-Language, and designations.

A concept's display is in the code system's language (`CodeSystem.language`, English
when unstated); other languages come from designations whose `language` matches the
requested tag or its primary subtag (`de` matches `de-CH`).
"""

from __future__ import annotations

from typing import Any

from terminology.codesystems import CodeSystemVersion
from terminology.concepts import Concept


def parse_accept_language(header: str | None) -> list[str]:
    """Language tags by preference (q-values honoured, q=0 dropped)."""
    if not header:
        return []
    weighted = []
    for position, item in enumerate(header.split(",")):
        tag, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for param in params:
            if param.replace(" ", "").startswith("q="):
                try:
                    q = float(param.split("=", 1)[1])
                except ValueError:
                    q = 0.0
        if tag and q > 0:
            weighted.append((-q, position, tag))
    return [tag for _, _, tag in sorted(weighted)]


def language_matches(wanted: str, actual: str | None) -> bool:
    if not actual:
        return False
    wanted, actual = wanted.lower(), actual.lower()
    return actual == wanted or actual.split("-")[0] == wanted or wanted.split("-")[0] == actual


def display_for(cs: CodeSystemVersion, concept: Concept, languages: list[str]) -> str | None:
    """The display to show in the first requested language that has one."""
    for language in languages:
        if language == "*":
            return concept.display
        if language_matches(language, cs.language or "en") and concept.display:
            return concept.display
        designation = designation_in(concept.designations, language)
        if designation is not None:
            return designation.get("value")
    return concept.display


def designation_in(designations: list[dict[str, Any]], language: str) -> dict[str, Any] | None:
    matching = [d for d in designations if language_matches(language, d.get("language"))]
    if not matching:
        return None
    exact = [d for d in matching if str(d.get("language", "")).lower() == language.lower()]
    return (exact or matching)[0]


def valid_displays(cs: CodeSystemVersion, concept: Concept, languages: list[str]) -> list[str]:
    """Displays that a Coding may carry for this concept in the requested languages."""
    displays = []
    if concept.display and (not languages or any(
        lang == "*" or language_matches(lang, cs.language or "en") for lang in languages
    )):
        displays.append(concept.display)
    for designation in concept.designations:
        value = designation.get("value")
        if not value:
            continue
        if not languages or any(language_matches(lang, designation.get("language") or cs.language or "en") for lang in languages):
            displays.append(value)
    return list(dict.fromkeys(displays))


HL7_TERM_MAINT = "http://terminology.hl7.org/CodeSystem/hl7TermMaintInfra"


def preferred(cs: CodeSystemVersion, display: str) -> dict[str, Any]:
    """The code system's own display as a designation (when another language is shown)."""
    return {
        "language": cs.language or "en",
        "use": {"system": HL7_TERM_MAINT, "code": "preferredForLanguage", "display": "Preferred For Language"},
        "value": display,
    }


def display_languages(cs: CodeSystemVersion, concept: Concept) -> dict[str, str]:
    """The language of each display a concept has (for messages listing them)."""
    found = {d["value"]: d["language"] for d in concept.designations if d.get("value") and d.get("language")}
    if concept.display:
        found[concept.display] = cs.language or "en"
    return found
