"""$validate-code for CodeSystem and ValueSet: is this code valid, and is it in the set?

The answer is a Parameters resource: `result`, the code system's own `display`, `code`,
`system`, `version`, `inactive`, and every problem as an issue (with `message` joining
the errors and warnings) in the wording and with the tx-issue-type codes the HL7
terminology ecosystem uses. Problems with the code are results (`result=false`), not
HTTP errors; only a value set that cannot be found or evaluated is an HTTP error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from terminology.codesystems import CodeSystemVersion
from terminology.concepts import Concept
from terminology.context import Context
from terminology.expansion import check_imports, contains
from terminology.languages import display_for, display_languages, valid_displays
from terminology.outcomes import TxError, TxIssue, outcome

ABSOLUTE = ("http:", "https:", "urn:")


@dataclass
class Coded:
    """One coding to validate, and the FHIRPath prefix its issues point at."""

    system: str | None
    code: str | None
    version: str | None = None
    display: str | None = None
    path: str = "Coding"

    def at(self, element: str) -> tuple[str, ...]:
        if self.path == "":
            return (element,)
        return (f"{self.path}.{element}",)


@dataclass
class Options:
    languages: list[str] = field(default_factory=list)
    abstract_allowed: bool = True
    active_only: bool = False
    lenient_display: bool = False
    infer_system: bool = False
    codeable_concept: dict[str, Any] | None = None  # as sent, echoed in the answer


@dataclass
class Verdict:
    valid: bool
    issues: list[TxIssue] = field(default_factory=list)
    cs: CodeSystemVersion | None = None
    concept: Concept | None = None
    unknown_system: str | None = None
    coded: Coded | None = None
    caused_by: bool = False  # the value set itself uses the unknown system


def _unknown_system_text(system: str, version: str | None, known: list[str]) -> str:
    if version and known:
        return (
            f"A definition for CodeSystem '{system}' version '{version}' could not be found, so the code "
            f"cannot be validated. Valid versions: {', '.join(sorted(known))}"
        )
    return f"A definition for CodeSystem '{system}' could not be found, so the code cannot be validated"


async def check_coding(context: Context, coded: Coded, options: Options) -> Verdict:
    """Validate one coding against its code system (no value set yet)."""
    if not coded.system:
        return Verdict(False, [TxIssue(
            "warning", "invalid",
            "Coding has no system. A code with no system has no defined meaning, and it cannot be validated. A system should be provided",
            "invalid-data", (coded.path or "code",),
        )], coded=coded)
    system = coded.system
    cs = await context.code_system(system, coded.version, coded.code)
    if cs is None:
        issues = []
        if not system.startswith(ABSOLUTE):
            issues.append(TxIssue(
                "error", "invalid", "Coding.system must be an absolute reference, not a local reference",
                "invalid-data", coded.at("system"),
            ))
        if await context.is_value_set(system):
            issues.append(TxIssue(
                "error", "invalid",
                f"The Coding references a value set, not a code system ('{system}')",
                "invalid-data", coded.at("system"),
            ))
            return Verdict(False, issues, coded=coded)
        supplement = await context.supplement(system)
        if supplement is not None:
            canonical = f"{system}|{supplement['version']}" if supplement.get("version") else system
            issues.append(TxIssue(
                "error", "invalid",
                f"CodeSystem {canonical} is a supplement, so can't be used as a value in Coding.system",
                "invalid-data", coded.at("system"),
            ))
            return Verdict(False, issues, coded=coded)
        known = await context.versions_of("CodeSystem", system)
        issues.append(TxIssue(
            "error", "not-found", _unknown_system_text(system, coded.version, known),
            "not-found", coded.at("system"),
        ))
        return Verdict(False, issues, unknown_system=system if not coded.version else f"{system}|{coded.version}", coded=coded)
    code = coded.code or ""
    concept = await cs.find(code)
    if concept is None:
        if cs.content == "fragment":
            version = f" version '{cs.version}'" if cs.version else ""
            return Verdict(True, [TxIssue(
                "warning", "code-invalid",
                f"Unknown Code '{code}' in the CodeSystem '{cs.url}'{version} - note that the code system is labeled as a fragment, so the code may be valid in some other fragment",
                "invalid-code", coded.at("code"), in_message=False,
            )], cs=cs, coded=coded)
        version = f" version '{cs.version}'" if cs.version else ""
        return Verdict(False, [TxIssue(
            "error", "code-invalid", f"Unknown code '{code}' in the CodeSystem '{cs.url}'{version}",
            "invalid-code", coded.at("code"),
        )], cs=cs, coded=coded)
    issues: list[TxIssue] = []
    if concept.code != code:
        issues.append(TxIssue(
            "information", "business-rule",
            f"The code '{code}' differs from the correct code '{concept.code}' by case. Although the code system '{cs.versioned()}' is case insensitive, implementers are strongly encouraged to use the correct case anyway",
            "code-rule", coded.at("code"),
        ))
    valid = True
    if concept.inactive or concept.status == "deprecated":
        issues.append(_status_issue(concept, coded))
    if coded.display is not None:
        display_issue = _display_issue(cs, concept, coded, options)
        if display_issue is not None:
            issues.append(display_issue)
            valid = valid and display_issue.severity != "error"
    if concept.abstract and not options.abstract_allowed:
        issues.append(TxIssue(
            "error", "business-rule",
            f"Code '{cs.url}#{concept.code}' is abstract, and not allowed in this context",
            "code-rule", coded.at("code"),
        ))
        valid = False
    return Verdict(valid, issues, cs, concept, coded=coded)


def _status_issue(concept: Concept, coded: Coded) -> TxIssue:
    if concept.status == "deprecated" and not concept.inactive:
        text = f"The concept '{concept.code}' is deprecated and its use should be reviewed"
    elif concept.status in ("retired",):
        text = f"The concept '{concept.code}' has a status of retired and inactive and its use should be reviewed"
    else:
        text = f"The concept '{concept.code}' has a status of inactive and its use should be reviewed"
    return TxIssue("warning", "business-rule", text, "code-comment", (coded.path or "code",))


def _display_issue(cs: CodeSystemVersion, concept: Concept, coded: Coded, options: Options) -> TxIssue | None:
    given = coded.display or ""
    candidates = valid_displays(cs, concept, options.languages)
    languages_of = display_languages(cs, concept)
    if given in candidates or (not candidates and not concept.display):
        return None
    if any(_normal(given) == _normal(c) for c in candidates):
        severity = "warning" if options.lenient_display else "error"
        return TxIssue(
            severity, "invalid",
            f"Wrong whitespace in Display Name '{given}' for {cs.url}#{concept.code}. Valid display is {_choices(candidates)}",
            "invalid-display", coded.at("display"),
        )
    if any(given.lower() == c.lower() for c in candidates) and not cs.case_sensitive:
        return None
    languages = ",".join(options.languages) if options.languages else "--"
    severity = "warning" if options.lenient_display else "error"
    if not candidates:
        if given in valid_displays(cs, concept, [cs.language or "en"]):
            return TxIssue(
                "information", "invalid",
                f"There are no valid display names found for the code {cs.url}#{concept.code} for language(s) '{languages}'. The display is '{given}' which is a valid display for the default language",
                "invalid-display", coded.at("display"),
            )
        return TxIssue(
            severity, "invalid",
            f"Wrong Display Name '{given}' for {cs.url}#{concept.code}. There are no valid display names found for language(s) '{languages}'. Default display is '{concept.display}'",
            "invalid-display", coded.at("display"),
        )
    return TxIssue(
        severity, "invalid",
        f"Wrong Display Name '{given}' for {cs.url}#{concept.code}. Valid display is {_choices(candidates, languages_of)} (for the language(s) '{languages}')",
        "invalid-display", coded.at("display"),
    )


def _normal(text: str) -> str:
    return " ".join(text.split())


def _choices(candidates: list[str], languages_of: dict[str, str] | None = None) -> str:
    if len(candidates) == 1:
        return f"'{candidates[0]}'"
    quoted = [f"'{c}'" + (f" ({languages_of[c]})" if languages_of and languages_of.get(c) else "") for c in candidates]
    return f"one of {len(candidates)} choices: {', '.join(quoted[:-1])} or {quoted[-1]}"


def _vs_canonical(vs: dict[str, Any]) -> str:
    url = vs.get("url") or "(unidentified)"
    return f"{url}|{vs['version']}" if vs.get("version") and vs.get("url") else url


async def infer_system(context: Context, vs: dict[str, Any], code: str) -> tuple[str | None, list[str]]:
    """The one code system of the value set that has this code, if exactly one does."""
    systems: list[str] = []
    for include in (vs.get("compose") or {}).get("include", []):
        system = include.get("system")
        if system and system not in systems:
            cs = await context.code_system(system, include.get("version"))
            if cs is not None and await cs.find(code) is not None:
                systems.append(system)
    return (systems[0] if len(systems) == 1 else None), systems


async def validate_in_value_set(context: Context, vs: dict[str, Any], coded_list: list[Coded], options: Options, codeable: bool) -> dict[str, Any]:
    """Validate codings against a value set (one Coding/code, or a CodeableConcept)."""
    vs_canonical = _vs_canonical(vs)
    await check_imports(context, vs)
    verdicts: list[Verdict] = []
    issues: list[TxIssue] = []
    found: Verdict | None = None
    any_member = False
    for coded in coded_list:
        if coded.system is None and coded.code and options.infer_system:
            system, systems = await infer_system(context, vs, coded.code)
            if system is None and len(systems) > 1:
                issues.append(TxIssue(
                    "error", "not-found",
                    f"The System URI could not be determined for the code '{coded.code}' in the ValueSet '{vs_canonical}': value set expansion has multiple matches: [{', '.join(systems)}]",
                    "cannot-infer", coded.at("code"),
                ))
            elif system is not None:
                coded.system = system
            else:
                candidates = [i["system"] for i in (vs.get("compose") or {}).get("include", []) if i.get("system")]
                issues.append(TxIssue(
                    "error", "not-found",
                    f"The System URI could not be determined for the code '{coded.code}' in the ValueSet '{vs_canonical}': none of its code systems ({', '.join(dict.fromkeys(candidates))}) has it",
                    "cannot-infer", coded.at("code"),
                ))
                verdict = Verdict(False, coded=coded)
                verdicts.append(verdict)
                verdict.issues.append(TxIssue(
                    "error", "code-invalid",
                    f"The provided code '#{coded.code}' was not found in the value set '{vs_canonical}'",
                    "not-in-vs", coded.at("code"),
                ))
                continue
        verdict = await check_coding(context, coded, options)
        verdicts.append(verdict)
        member = False
        if verdict.unknown_system and _uses_system(vs, coded.system):
            verdict.caused_by = True
            continue
        if verdict.unknown_system:
            verdict.issues = [
                TxIssue(i.severity, i.code, i.text.replace(f"CodeSystem '{coded.system}'", f"CodeSystem {coded.system}"), i.tx_code, i.expression)
                if str(coded.system).startswith(ABSOLUTE) else i
                for i in verdict.issues
            ]
        if verdict.concept is not None and verdict.cs is not None:
            try:
                member = bool(await contains(context, vs, verdict.cs, verdict.concept))
            except TxError as exc:
                if not any(i.code == "not-found" for i in exc.issues):
                    raise  # a broken value set is an error of the request, not a result
                shown_verdict = None if codeable else verdict
                return _answer(False, shown_verdict, exc.issues, [verdict], codeable, coded_list if codeable else None, options)
            inactive_excluded = (vs.get("compose") or {}).get("inactive") is False or options.active_only
            if member and not options.abstract_allowed and verdict.concept.abstract:
                member = False
            if member and inactive_excluded and verdict.concept.inactive:
                member = False
                verdict.issues.insert(0, TxIssue(
                    "error", "business-rule",
                    f"The concept '{verdict.concept.code}' is valid but is not active",
                    "code-rule", coded.at("code"),
                ))
        elif verdict.cs is not None and verdict.cs.content == "fragment":
            member = verdict.valid
        any_member = any_member or member
        if member and verdict.valid:
            found = found or verdict
            if verdict.concept is not None and _deprecated_in(vs, coded.system, verdict.concept.code):
                verdict.issues.append(TxIssue(
                    "warning", "business-rule",
                    f"The presence of the concept '{verdict.concept.code}' in the system '{coded.system}' in the value set {vs_canonical} is marked with a status of deprecated and its use should be reviewed",
                    "code-comment", coded.at("code"), in_message=False,
                ))
        else:
            shown = f"{coded.system or ''}#{coded.code}"
            if coded.display and verdict.cs is not None:
                shown += f" ('{coded.display}')"
            if not member:
                severity = "information" if codeable else "error"
                verdict.issues.append(TxIssue(
                    severity, "code-invalid",
                    f"The provided code '{shown}' was not found in the value set '{vs_canonical}'",
                    "this-code-not-in-vs" if codeable else "not-in-vs",
                    coded.at("code"),
                ))
    for v in verdicts:
        issues.extend(v.issues)
    chosen = found or next((v for v in verdicts if v.concept is not None), None) or (verdicts[0] if verdicts else None)
    result = found is not None
    if codeable and not any_member:
        chosen = None  # no coding of the CodeableConcept is in the value set: nothing to report on
    if codeable and not result and not any_member:
        issues.insert(0, TxIssue(
            "error", "code-invalid", f"No valid coding was found for the value set '{vs_canonical}'", "not-in-vs",
        ))
    return _answer(result, chosen, issues + status_issues(context), verdicts, codeable, coded_list if codeable else None, options)


VALUESET_DEPRECATED = "http://hl7.org/fhir/StructureDefinition/valueset-deprecated"
STANDARDS_STATUS = "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status"


def _deprecated_in(vs: dict[str, Any], system: str | None, code: str) -> bool:
    """Whether the value set lists this concept with a deprecated mark."""
    for include in (vs.get("compose") or {}).get("include", []):
        if include.get("system") != system:
            continue
        for item in include.get("concept", []):
            if item.get("code") != code:
                continue
            for ext in item.get("extension", []):
                if ext.get("url") == VALUESET_DEPRECATED and ext.get("valueBoolean", ext.get("valueCode")) in (True, "true"):
                    return True
                if ext.get("url") == STANDARDS_STATUS and ext.get("valueCode") == "deprecated":
                    return True
    return False


def _uses_system(vs: dict[str, Any], system: str | None) -> bool:
    return any(i.get("system") == system for i in (vs.get("compose") or {}).get("include", []))


def status_issues(context: Context) -> list[TxIssue]:
    return [
        TxIssue("information", "business-rule", f"Reference to {status} {kind} {canonical}", "status-check")
        for canonical, (kind, status) in context.notes.items()
    ]


async def validate_in_code_system(context: Context, coded_list: list[Coded], options: Options, codeable: bool) -> dict[str, Any]:
    verdicts = [await check_coding(context, coded, options) for coded in coded_list]
    issues = [i for v in verdicts for i in v.issues]
    good = next((v for v in verdicts if v.valid and v.concept is not None), None)
    chosen = good or next((v for v in verdicts if v.concept is not None), None) or (verdicts[0] if verdicts else None)
    valid = good is not None or (bool(verdicts) and all(v.valid for v in verdicts))
    return _answer(valid, chosen, issues + status_issues(context), verdicts, codeable, coded_list if codeable else None, options)


def _answer(
    result: bool, chosen: Verdict | None, issues: list[TxIssue], verdicts: list[Verdict], codeable: bool,
    codeable_concept: list[Coded] | None, options: Options,
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [{"name": "result", "valueBoolean": result}]
    if codeable_concept is not None:
        parameters.append({"name": "codeableConcept", "valueCodeableConcept": options.codeable_concept or {"coding": [
            {k: v for k, v in (("system", c.system), ("version", c.version), ("code", c.code), ("display", c.display)) if v is not None}
            for c in codeable_concept
        ]}})
    if chosen is not None and chosen.coded is not None:
        coded = chosen.coded
        if chosen.concept is not None and codeable:
            parameters.append({"name": "code", "valueCode": chosen.concept.code})
        elif coded.code and not codeable:
            parameters.append({"name": "code", "valueCode": coded.code})
        if chosen.concept is not None and coded.code and chosen.concept.code != coded.code:
            parameters.append({"name": "normalized-code", "valueCode": chosen.concept.code})
        if chosen.cs is not None:
            parameters.append({"name": "system", "valueUri": chosen.cs.url})
            if chosen.cs.version:
                parameters.append({"name": "version", "valueString": chosen.cs.version})
        elif coded.system and not codeable:
            parameters.append({"name": "system", "valueUri": coded.system})
        if chosen.concept is not None:
            display = display_for(chosen.cs, chosen.concept, options.languages) if chosen.cs else chosen.concept.display
            if display:
                parameters.append({"name": "display", "valueString": display})
            if chosen.concept.inactive:
                parameters.append({"name": "inactive", "valueBoolean": True})
            if chosen.concept.status and chosen.concept.status != "active":
                parameters.append({"name": "status", "valueCode": chosen.concept.status})
    for verdict in verdicts:
        if verdict.unknown_system:
            name = "x-caused-by-unknown-system" if verdict.caused_by else "x-unknown-system"
            parameters.append({"name": name, "valueCanonical": verdict.unknown_system})
    shown = [
        i for i in issues
        if i.in_message and (i.severity in ("error", "warning") or i.tx_code == "invalid-display")
    ]
    shown = shown or [i for i in issues if i.severity == "information" and not result]
    if shown:
        parameters.append({"name": "message", "valueString": "; ".join(sorted({i.text for i in shown}))})
    if issues:
        parameters.append({"name": "issues", "resource": outcome(issues)})
    return {"resourceType": "Parameters", "parameter": parameters}

