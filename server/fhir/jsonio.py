"""FHIR JSON in and out, without losing what the client sent.

A FHIR decimal carries its precision in its lexical form (`1.50` is not `1.5`), so
resources are parsed with decimals as `Decimal` (simplejson keeps the exponent) and
serialized back from the same values: numbers, element order and strings come back as
they were sent, only insignificant whitespace goes. orjson would be faster but turns
`1.50` into `1.5`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import simplejson

from server.fhir.outcome import FhirError, Issue, error

JSONObject = dict[str, Any]


def parse(body: bytes) -> Any:
    """Parse a request body; any syntax or encoding problem is a 400 OperationOutcome."""
    if not body.strip():
        raise error(400, "invalid", "The request body is empty; a JSON document is required")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(400, "invalid", f"The request body is not UTF-8: {exc}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return simplejson.loads(text, use_decimal=True)
    except simplejson.JSONDecodeError as exc:
        raise error(
            400, "invalid", f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise error(400, "too-costly", "The request body is nested too deeply") from None


def parse_resource(body: bytes) -> JSONObject:
    document = parse(body)
    if not isinstance(document, dict):
        raise error(400, "structure", "The request body must be a JSON object (a FHIR resource)")
    if not isinstance(document.get("resourceType"), str):
        raise error(400, "required", "The resource has no resourceType", "resourceType")
    return document


def dumps(value: Any) -> bytes:
    """Compact JSON, decimals exactly as parsed, non-ASCII as UTF-8."""
    try:
        return simplejson.dumps(
            value, use_decimal=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape ("\ud800") parses but is not encodable text.
        raise FhirError(
            400, [Issue("invalid", "The resource contains an unpaired Unicode surrogate")]
        ) from None


def loads(body: bytes) -> Any:
    """Parse bytes this server wrote (trusted), keeping decimal precision."""
    return simplejson.loads(body, use_decimal=True)


def pretty(body: bytes) -> bytes:
    """Indented form for `_pretty=true`, numbers unchanged."""
    return (
        simplejson.dumps(loads(body), use_decimal=True, indent=2, ensure_ascii=False) + "\n"
    ).encode("utf-8")


def plain(value: Any) -> Any:
    """Decimals as floats, for code that needs plain JSON values (e.g. JSON Patch tests)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
