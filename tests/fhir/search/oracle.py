"""An independent evaluation of search parameters for the tests: fhirpathpy evaluates the
definitions' FHIRPath, and plain Python decides what a search value matches.

fhirpathpy has no `resolve()`; `where(resolve() is T)` is evaluated as
`where(reference.startsWith('T/'))` (or a `#` reference when a contained resource of
type T exists), which is what it means for the references of the examples. fhirpathpy also insists (as FHIRPath 2.0 does) that `as` applies to a
single item, while search expressions apply it to collections with the meaning of
`ofType`, so `X as T` and `X.as(T)` are evaluated as `X.ofType(T)`.
"""

from __future__ import annotations

import re
import unicodedata

_RESOLVE_IS = re.compile(r"where\(resolve\(\) is ([A-Za-z]+)\)")
_AS_INFIX = re.compile(r"\(([^()]+) as ([A-Za-z]+)\)")


def library_expression(expression: str) -> str:
    expression = _RESOLVE_IS.sub(
        lambda m: f"where(reference.startsWith('{m.group(1)}/') or reference.contains('/{m.group(1)}/') or "
        f"(reference.startsWith('#') and "
        f"%resource.contained.where(resourceType = '{m.group(1)}').exists()))",
        expression,
    )
    expression = _AS_INFIX.sub(lambda m: f"{m.group(1)}.ofType({m.group(2)})", expression)
    return expression.replace(".as(", ".ofType(")


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
