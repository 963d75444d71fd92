"""The terminology operations as FHIR operations (GET and POST, type and instance level).

Each handler reads its Parameters (query-string values arrive as strings and are read
by the type the operation defines), builds a request `Context` (stored definitions plus
any `tx-resource` sent along), calls one engine function and returns its Parameters or
ValueSet. Engine errors become OperationOutcomes with tx-issue-type details.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from server.fhir import interactions, jsonio
from server.fhir.operations import OperationCall, OperationResult, operation
from server.store.terminology import TerminologyStore
from terminology import closure as closures, conceptmaps, lookup as lookups
from terminology.context import Context, split_canonical
from terminology.expansion import DEFAULT_LIMIT, ECHOED, ExpandOptions, expand
from terminology.languages import parse_accept_language
from terminology.outcomes import TxError, outcome, tx_error
from terminology.validation import Coded, Options, validate_in_code_system, validate_in_value_set

Handler = Callable[[OperationCall], Awaitable[OperationResult]]


def guarded(handler: Handler) -> Handler:
    async def run(call: OperationCall) -> OperationResult:
        try:
            return await handler(call)
        except TxError as exc:
            return OperationResult(outcome(exc.issues), exc.status)

    run.__doc__ = handler.__doc__
    return run


# --- reading parameters -------------------------------------------------------------------


def value(call: OperationCall, name: str) -> Any:
    values = call.values(name)
    return values[0] if values else None


def text(call: OperationCall, name: str) -> str | None:
    v = value(call, name)
    if v is None:
        return None
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise tx_error(400, "invalid", f"The parameter '{name}' must be a primitive value")
    return str(v)


def flag(call: OperationCall, name: str, default: bool = False) -> bool:
    v = value(call, name)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "false"):
        return str(v).lower() == "true"
    raise tx_error(400, "invalid", f"The parameter '{name}' must be true or false, not '{v}'")


MAX_INTEGER = 2**31 - 1  # the largest FHIR integer


def number(call: OperationCall, name: str) -> int | None:
    v = value(call, name)
    if v is None:
        return None
    try:
        n = int(str(v))
    except ValueError:
        raise tx_error(400, "invalid", f"The parameter '{name}' must be an integer, not '{v}'") from None
    if n < 0:
        raise tx_error(400, "invalid", f"The parameter '{name}' must not be negative")
    if n > MAX_INTEGER:
        # a FHIR integer is 32-bit; a larger offset reached MongoDB's skip, which takes
        # 64 bits at most (OverflowError, a 500)
        raise tx_error(400, "invalid", f"The parameter '{name}' must be at most {MAX_INTEGER} (a FHIR integer)")
    return n


def resource_param(call: OperationCall, name: str, type_: str) -> dict[str, Any] | None:
    v = value(call, name)
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("resourceType") != type_:
        raise tx_error(400, "invalid", f"The parameter '{name}' must be a {type_} resource")
    return v


def coding_param(call: OperationCall, name: str) -> dict[str, Any] | None:
    v = value(call, name)
    if v is None:
        return None
    if isinstance(v, str):  # GET form: system|code
        system, _, code = v.rpartition("|")
        return {"system": system or None, "code": code}
    if not isinstance(v, dict):
        raise tx_error(400, "invalid", f"The parameter '{name}' must be a Coding")
    return checked_coding(v, name)


def checked_coding(coding: dict[str, Any], where: str) -> dict[str, Any]:
    """A Coding whose system, version, code and display are strings (never query operators)."""
    for key in ("system", "version", "code", "display"):
        if key in coding and not isinstance(coding[key], str):
            raise tx_error(400, "invalid", f"{where}.{key} must be a string")
    return coding


def context_for(call: OperationCall) -> Context:
    resources = [r for r in call.values("tx-resource") if isinstance(r, dict)]
    return Context(TerminologyStore(call.db.store), resources)


def expansion_limit(call: OperationCall) -> int:
    """The configured limit, lowered (never raised) by an X-TOO-COSTLY-THRESHOLD header."""
    service = call.services.get("terminology")
    limit = service.expansion_limit if service is not None else DEFAULT_LIMIT
    header = call.headers.get("x-too-costly-threshold", "")
    return min(limit, int(header)) if header.isascii() and header.isdigit() else limit


def languages(call: OperationCall) -> list[str]:
    display_language = text(call, "displayLanguage")
    if display_language:
        return parse_accept_language(display_language)
    return parse_accept_language(call.headers.get("accept-language"))


async def instance(call: OperationCall) -> dict[str, Any] | None:
    """The stored resource an instance-level call is about."""
    if call.id is None:
        return None
    assert call.type is not None
    stored = await interactions.read(call.db, call.type, call.id)
    assert stored.body is not None
    return jsonio.loads(stored.body)


EXPANSION_PARAMETER = "http://hl7.org/fhir/StructureDefinition/valueset-expansion-parameter"


def expansion_parameters(vs: dict[str, Any]) -> list[dict[str, Any]]:
    """Expansion parameters the value set itself sets (compose extension)."""
    found = []
    for ext in (vs.get("compose") or {}).get("extension", []):
        if ext.get("url") != EXPANSION_PARAMETER:
            continue
        parts = {e.get("url"): e for e in ext.get("extension", [])}
        name = parts.get("name", {}).get("valueCode")
        value_part = {k: v for k, v in parts.get("value", {}).items() if k.startswith("value")}
        if name and value_part:
            found.append({"name": name, **value_part})
    return found


def echo(call: OperationCall) -> list[dict[str, Any]]:
    return [
        {"name": p["name"], **{k: v for k, v in p.items() if k.startswith("value")}}
        for p in call.parameters.get("parameter", [])
        if p.get("name") in ECHOED and any(k.startswith("value") for k in p)
    ]


# --- ValueSet/$expand ---------------------------------------------------------------------


VALUESET_SUPPLEMENT = "http://hl7.org/fhir/StructureDefinition/valueset-supplement"


async def apply_supplements(call: OperationCall, context: Context, vs: dict[str, Any] | None) -> None:
    """`useSupplement` parameters and the value set's valueset-supplement extensions."""
    references = [str(v) for v in call.values("useSupplement")]
    if vs is not None:
        references += [str(e.get("valueCanonical")) for e in vs.get("extension", []) if e.get("url") == VALUESET_SUPPLEMENT]
    await context.require_supplements(list(dict.fromkeys(references)))


async def value_set_for(call: OperationCall, context: Context, url_name: str = "url") -> dict[str, Any]:
    vs = await instance(call) or resource_param(call, "valueSet", "ValueSet")
    if vs is not None:
        context.note(vs)
        context.contained = vs.get("contained", [])
        await apply_supplements(call, context, vs)
        return vs
    url = text(call, url_name)
    if url is None:
        raise tx_error(400, "required", "A value set is required: give url, valueSet, or call on an instance", "vs-invalid")
    version = text(call, "valueSetVersion")
    found = await context.resource("ValueSet", url, version)
    if found is None:
        shown = f"{url}|{version}" if version else url
        raise tx_error(404, "not-found", f"A definition for the value Set '{shown}' could not be found", "not-found")
    context.contained = found.get("contained", [])
    await apply_supplements(call, context, found)
    return found


@operation("expand", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/ValueSet-expand", {"ValueSet"})
@guarded
async def expand_operation(call: OperationCall) -> OperationResult:
    context = context_for(call)
    count, offset = number(call, "count"), number(call, "offset")  # checked before any lookup
    vs = await value_set_for(call, context)
    defaults = expansion_parameters(vs)
    if defaults:
        call.parameters = {**call.parameters, "parameter": [
            *call.parameters.get("parameter", []),
            *(d for d in defaults if not call.values(d["name"])),
        ]}
    options = ExpandOptions(
        count=count,
        offset=offset or 0,
        filter=text(call, "filter"),
        active_only=flag(call, "activeOnly") or (vs.get("compose") or {}).get("inactive") is False,
        exclude_not_for_ui=flag(call, "excludeNotForUI"),
        include_designations=flag(call, "includeDesignations"),
        languages=languages(call),
        properties=[str(p) for p in call.values("property")],
        designation_languages=[
            str(d).partition("|")[2] for d in call.values("designation") if str(d).startswith("urn:ietf:bcp:47|")
        ],
        echo=echo(call),
        offset_given=offset is not None,
        limit=expansion_limit(call),
    )
    if call.headers.get("accept-language") and not call.values("displayLanguage"):
        options.echo.append({"name": "displayLanguage", "valueCode": call.headers["accept-language"]})
    return OperationResult(await expand(context, vs, options))


# --- $validate-code -----------------------------------------------------------------------


def codings_from(call: OperationCall, code_path: str) -> tuple[list[Coded], bool]:
    """The codings to validate (code+system, coding, or codeableConcept) and whether it is a CodeableConcept."""
    concept = value(call, "codeableConcept")
    if isinstance(concept, dict):
        codings = [checked_coding(c, "codeableConcept.coding") for c in concept.get("coding", []) if isinstance(c, dict)]
        return [
            Coded(c.get("system"), c.get("code"), c.get("version"), c.get("display"), f"CodeableConcept.coding[{i}]")
            for i, c in enumerate(codings)
        ], True
    coding = coding_param(call, "coding")
    if coding is not None:
        return [Coded(coding.get("system"), coding.get("code"), coding.get("version"), coding.get("display"), "Coding")], False
    code = text(call, "code")
    if code is None:
        raise tx_error(400, "required", "Give a code (with system), a coding or a codeableConcept to validate", "invalid-data")
    return [Coded(text(call, "system"), code, text(call, "systemVersion") or text(call, "version"), text(call, "display"), code_path)], False


def validation_options(call: OperationCall) -> Options:
    concept = value(call, "codeableConcept")
    return Options(
        codeable_concept=concept if isinstance(concept, dict) else None,
        languages=languages(call),
        abstract_allowed=flag(call, "abstract", True),
        active_only=flag(call, "activeOnly"),
        lenient_display=flag(call, "lenient-display-validation"),
        infer_system=flag(call, "inferSystem"),
    )


@operation("validate-code", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/ValueSet-validate-code", {"ValueSet", "CodeSystem"})
@guarded
async def validate_code_operation(call: OperationCall) -> OperationResult:
    context = context_for(call)
    options = validation_options(call)
    if call.type == "CodeSystem":
        await apply_supplements(call, context, None)
        cs = await instance(call) or resource_param(call, "codeSystem", "CodeSystem")
        codings, codeable = codings_from(call, "")
        if cs is not None:
            context.tx_resources.append(cs)
        url = (cs or {}).get("url") or text(call, "url")
        if url:
            url, version = split_canonical(url)
            for coded in codings:
                coded.system = coded.system or url
                coded.version = coded.version or version or (cs or {}).get("version")
        return OperationResult(await validate_in_code_system(context, codings, options, codeable))
    vs = await value_set_for(call, context)
    if not options.languages:
        from_vs = [str(p.get("valueCode") or p.get("valueString")) for p in expansion_parameters(vs) if p["name"] == "displayLanguage"]
        options.languages = parse_accept_language(from_vs[0] if from_vs else vs.get("language"))
    codings, codeable = codings_from(call, "")
    return OperationResult(await validate_in_value_set(context, vs, codings, options, codeable))


# --- CodeSystem/$lookup and $subsumes -----------------------------------------------------


async def code_system_for(call: OperationCall, context: Context, system: str | None, version: str | None, code: str | None = None) -> Any:
    stored = await instance(call)
    if stored is not None:
        context.tx_resources.append(stored)
        system, version = stored.get("url"), stored.get("version")
    if not system:
        raise tx_error(400, "required", "A system (or coding) is required", "invalid-data")
    cs = await context.code_system(system, version, code)
    if cs is None:
        raise tx_error(
            404, "not-found",
            f"A definition for CodeSystem '{system}' could not be found, so the code cannot be looked up",
            "not-found",
        )
    return cs


@operation("lookup", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup", {"CodeSystem"})
@guarded
async def lookup_operation(call: OperationCall) -> OperationResult:
    context = context_for(call)
    await apply_supplements(call, context, None)
    coding = coding_param(call, "coding") or {"system": text(call, "system"), "code": text(call, "code"), "version": text(call, "version")}
    code = coding.get("code")
    if not code:
        raise tx_error(400, "required", "A code (or coding) is required", "invalid-data")
    cs = await code_system_for(call, context, coding.get("system"), coding.get("version"), code)
    concept = await cs.find(code)
    if concept is None:
        version = f" version '{cs.version}'" if cs.version else ""
        raise tx_error(404, "not-found", f"Unknown code '{code}' in the CodeSystem '{cs.url}'{version}", "invalid-code")
    properties = [str(p) for p in call.values("property")]
    return OperationResult(await lookups.lookup(cs, concept, properties, languages(call)))


@operation("subsumes", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/CodeSystem-subsumes", {"CodeSystem"})
@guarded
async def subsumes_operation(call: OperationCall) -> OperationResult:
    context = context_for(call)
    a = coding_param(call, "codingA") or {"code": text(call, "codeA"), "system": text(call, "system")}
    b = coding_param(call, "codingB") or {"code": text(call, "codeB"), "system": text(call, "system")}
    if not a.get("code") or not b.get("code"):
        raise tx_error(400, "required", "Give codeA and codeB (with system), or codingA and codingB", "invalid-data")
    system = a.get("system") or b.get("system") or text(call, "system")
    if a.get("system") and b.get("system") and a["system"] != b["system"]:
        raise tx_error(400, "invalid", "codingA and codingB must be from the same code system", "invalid-data")
    cs = await code_system_for(call, context, system, text(call, "version"))
    return OperationResult(await lookups.subsumes(cs, str(a["code"]), str(b["code"])))


# --- ConceptMap/$translate ----------------------------------------------------------------


@operation("translate", {"type", "instance"}, "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate", {"ConceptMap"})
@guarded
async def translate_operation(call: OperationCall) -> OperationResult:
    context = context_for(call)
    conceptmap = await instance(call) or resource_param(call, "conceptMap", "ConceptMap")
    maps = [conceptmap] if conceptmap else [r for r in context.tx_resources if r.get("resourceType") == "ConceptMap"]
    reverse = flag(call, "reverse")
    coding = coding_param(call, "coding") or coding_param(call, "sourceCoding")
    if coding is None and text(call, "targetCode"):
        reverse = True
        coding = {"system": text(call, "targetSystem"), "code": text(call, "targetCode")}
        target_system = text(call, "sourceSystem") or text(call, "system")
    else:
        coding = coding or {
            "system": text(call, "system") or text(call, "sourceSystem"),
            "code": text(call, "code") or text(call, "sourceCode"),
        }
        target_system = text(call, "targetsystem") or text(call, "targetSystem")
    concept = value(call, "codeableConcept") or value(call, "sourceCodeableConcept")
    if isinstance(concept, dict) and concept.get("coding") and isinstance(concept["coding"][0], dict):
        coding = checked_coding(concept["coding"][0], "codeableConcept.coding")
    if not isinstance(coding.get("system"), str) or not isinstance(coding.get("code"), str) or not coding["code"]:
        raise tx_error(400, "required", "Give a system and code (or a coding) to translate", "invalid-data")
    dependencies = [
        {p.get("name"): next((v for k, v in p.items() if k.startswith("value")), None) for p in d.get("part", [])}
        for d in call.parameters.get("parameter", []) if d.get("name") == "dependency"
    ]
    url = (conceptmap or {}).get("url") or text(call, "url")
    result = await conceptmaps.translate(
        context, str(coding["system"]), str(coding["code"]), target_system, reverse,
        url, text(call, "conceptMapVersion"), dependencies, maps,
    )
    return OperationResult(result)


# --- $closure -----------------------------------------------------------------------------


@operation("closure", {"system"}, "http://hl7.org/fhir/OperationDefinition/ConceptMap-closure", affects_state=True)
@guarded
async def closure_operation(call: OperationCall) -> OperationResult:
    name = text(call, "name")
    if not name:
        raise tx_error(400, "required", "The closure table name is required", "invalid-data")
    concepts = [checked_coding(c, "concept") for c in call.values("concept") if isinstance(c, dict)]
    if len(concepts) != len(call.values("concept")):
        raise tx_error(400, "invalid", "Each concept must be a Coding", "invalid-data")
    since = text(call, "version")
    if since is not None and not (since.isascii() and since.isdigit()):
        raise tx_error(400, "invalid", f"version {since!r} is not a closure table version", "invalid-data")
    result = await closures.closure(call.db.store, context_for(call), name, concepts, int(since) if since else None)
    return OperationResult(result)
