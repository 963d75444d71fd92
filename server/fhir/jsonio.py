"""FHIR JSON in and out, without losing what the client sent.

A FHIR decimal carries its precision in its lexical form (`1.50` is not `1.5`), so a
resource must come back with its numbers exactly as sent. The standard library's C
parser hands each decimal's lexeme to a hook: when every one of them prints back
identically from a float (the common case: `72.5`, `0.25`), the floats are exact;
otherwise the body is read again with simplejson into `Decimal`s that remember their
lexemes. (The lexeme check used to be a regular expression over the body after orjson
had read it; that scan cost twice the parse.) Output always goes through orjson, with
`Decimal`s written as their own lexeme (`orjson.Fragment`).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson
import simplejson

from server.fhir.outcome import FhirError, Issue, error

JSONObject = dict[str, Any]

_BOM = b"\xef\xbb\xbf"


class Lexeme(Decimal):
    """A decimal that remembers how it was written (`1.0e-5` stays `1.0e-5`, not the
    `0.000010` Decimal would print)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> Lexeme:
        value = super().__new__(cls, text)
        value.text = text
        return value

    def __reduce__(self) -> tuple[type[Lexeme], tuple[str]]:
        return Lexeme, (self.text,)


def _exact_int(lexeme: str) -> int | Decimal:
    """Integers beyond 64 bits stay exact, which orjson can write back (big ints it cannot)."""
    return int(lexeme) if len(lexeme) < 19 else Lexeme(lexeme)


def _exact(text: str) -> Any:
    return simplejson.loads(text, parse_float=Lexeme, parse_int=_exact_int)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def loads(body: bytes) -> Any:
    """Parse JSON keeping every decimal's lexical form; raises ValueError if invalid
    (UnicodeDecodeError, simplejson.JSONDecodeError, RecursionError)."""
    text = body.decode("utf-8")
    inexact = False

    def checked_float(lexeme: str) -> float:
        nonlocal inexact
        value = float(lexeme)
        if orjson.dumps(value) != lexeme.encode():
            inexact = True
        return value

    try:
        value = json.loads(text, parse_float=checked_float, parse_int=_exact_int, parse_constant=_not_json)
    except ValueError:
        return _exact(text)  # simplejson's error says where (or it reads what json cannot)
    return _exact(text) if inexact else value


def parse(body: bytes) -> Any:
    """Parse a request body; any syntax or encoding problem is a 400 OperationOutcome."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if not body.strip():
        raise error(400, "invalid", "The request body is empty; a JSON document is required")
    try:
        document = loads(body)
    except UnicodeDecodeError as exc:
        raise error(400, "invalid", f"The request body is not UTF-8: {exc}") from None
    except simplejson.JSONDecodeError as exc:
        raise error(
            400, "invalid",
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise error(400, "too-costly", "The request body is nested too deeply") from None
    check_text(body, document)
    return document


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_text(body: bytes, document: Any) -> None:
    """Refuse a document holding a lone surrogate escape (`"\\ud800"`): valid JSON syntax,
    but not text, so it cannot be encoded as UTF-8.

    It used to be refused only when stored (`dumps`), and code that reads the document
    first failed on it with a 500: the narrative check, the transaction's scan for
    conditional references. Only a body with an escape in the surrogate range is re-encoded
    to check (a pair, as for an emoji, passes).
    """
    if b"\\u" in body and _SURROGATE_ESCAPE.search(body):
        try:
            orjson.dumps(document, default=_exact_decimal)
        except TypeError as exc:
            raise error(400, "invalid", f"The request body holds a character that is not text: {exc}") from None


def parse_resource(body: bytes) -> JSONObject:
    document = parse(body)
    if not isinstance(document, dict):
        raise error(400, "structure", "The request body must be a JSON object (a FHIR resource)")
    if not isinstance(document.get("resourceType"), str):
        raise error(400, "required", "The resource has no resourceType", "resourceType")
    return document


def _exact_decimal(value: Any) -> orjson.Fragment:
    if isinstance(value, Lexeme):
        return orjson.Fragment(value.text)
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"cannot serialize {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Compact JSON, decimals exactly as parsed, non-ASCII as UTF-8."""
    try:
        return orjson.dumps(value, default=_exact_decimal)
    except TypeError as exc:
        # A lone surrogate escape ("\ud800") parses but is not encodable text.
        raise FhirError(400, [Issue("invalid", f"The resource cannot be stored as JSON: {exc}")]) from None


def pretty(body: bytes) -> bytes:
    """Indented form for `_pretty=true`, numbers unchanged."""
    return orjson.dumps(loads(body), default=_exact_decimal, option=orjson.OPT_INDENT_2) + b"\n"


def plain(value: Any) -> Any:
    """Decimals as floats, for libraries that expect plain JSON values (fhirpathpy)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
