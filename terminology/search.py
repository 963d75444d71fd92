"""What the search engine (server/fhir/search) calls for token modifiers that need terminology.

- `:in` / `:not-in`: `value_set_codes` gives the (system, code) pairs a value set
  contains, to compile into an index query on the token terms. As search.html says, the
  value is a URI (relative or absolute) identifying a value set: a literal reference
  (`ValueSet/[id]`, the server's base already removed by the search) is read as one,
  otherwise it is a canonical URL, including the implicit value sets of code systems
  (`[system]?fhir_vs`, `[system]?fhir_vs=isa/[code]`). A value set that cannot be found
  is refused (`not-found`), not taken as empty: an empty answer would look like "no
  data" when the question could not be asked.
- `:below` / `:above`: `below` / `above` give a concept's descendants / ancestors (the
  concept included), from the stored is-a closure; an unknown code system is refused.
- `subsumes` answers one pair without listing anything.
- `SearchTerminology` is the engine `server.fhir.search.terminology.install` takes.

Beyond the limit the search gives, the answer is refused as too costly (where the value
set is a plain selection from one code system it is counted in the store and read no
further than the limit, so a value set over all of SNOMED CT is not read whole). Nothing here knows about search
parameters or query syntax, and no result is cached: each call reads the definitions
current at that moment, on any server process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from server.fhir import jsonio
from server.fhir.search.terminology import Refused
from server.store.database import Store
from server.store.terminology import ConceptCriteria, TerminologyStore
from terminology.context import Context
from terminology.expansion import ExpandOptions, Expander
from terminology.outcomes import TxError

# the largest value set or hierarchy these functions list (beyond it: too-costly)
MAX_CODES = 100_000
LITERAL = re.compile(r"ValueSet/[A-Za-z0-9\-.]{1,64}")


class TerminologyUnavailable(Refused):
    """The value set or code system is not known (`not-found`), or is too large to use
    this way (`too-costly`)."""


def _context(store: Store) -> Context:
    return Context(TerminologyStore(store))


async def _value_set(context: Context, reference: str) -> dict[str, Any] | None:
    if LITERAL.fullmatch(reference) and context.store is not None:
        stored = await context.store.definition(reference)
        return jsonio.loads(stored.body) if stored is not None else None
    return await context.resource("ValueSet", reference)


async def value_set_codes(store: Store, value_set: str, limit: int = MAX_CODES) -> set[tuple[str, str]]:
    """The (system, code) pairs in the value set (for `:in` and `:not-in`)."""
    context = _context(store)
    vs = await _value_set(context, value_set)
    if vs is None:
        raise TerminologyUnavailable("not-found", f"the value set {value_set} is not known")
    try:
        # `count` lets a single-system selection be counted in the store, not listed
        expander = Expander(context, ExpandOptions(count=limit, limit=limit))
        collected = await expander.compose(vs, (value_set,))
    except TxError as exc:
        code = exc.issues[0].code if exc.issues else "processing"
        raise TerminologyUnavailable(code, f"the value set {value_set} cannot be expanded: {exc}") from None
    if max(collected.total or 0, len(collected.entries)) > limit:
        raise TerminologyUnavailable("too-costly", f"the value set {value_set} has more than {limit} codes")
    return set(collected.entries)


async def below(store: Store, system: str, code: str, limit: int = MAX_CODES) -> list[str]:
    """The code and every code it subsumes (for `:below`)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable("not-found", f"the code system {system} is not known")
    criteria = ConceptCriteria(self_or_descendant_of=code)
    if await cs.source.count(criteria, []) > limit:
        raise TerminologyUnavailable("too-costly", f"{system}|{code} has more than {limit} descendants")
    return [c.code for c in await cs.source.select(criteria, [])] or [code]


async def above(store: Store, system: str, code: str, limit: int = MAX_CODES) -> list[str]:
    """The code and every code that subsumes it (for `:above`)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable("not-found", f"the code system {system} is not known")
    concept = await cs.find(code)
    found = [code, *(concept.ancestors if concept else [])]
    if len(found) > limit:
        raise TerminologyUnavailable("too-costly", f"{system}|{code} has more than {limit} ancestors")
    return found


async def subsumes(store: Store, system: str, ancestor: str, code: str) -> bool:
    """Whether `ancestor` subsumes `code` (or is the same concept)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable("not-found", f"the code system {system} is not known")
    concept = await cs.find(code)
    return concept is not None and (concept.code == ancestor or ancestor in concept.ancestors)


@dataclass(frozen=True)
class SearchTerminology:
    """The engine for `:in`, `:not-in`, `:above` and `:below` (server/fhir/search/terminology.py)."""

    store: Store

    async def expand(self, value_set: str, limit: int) -> list[tuple[str, str]]:
        return sorted(await value_set_codes(self.store, value_set, limit))

    async def subsumption(self, system: str, code: str, direction: str, limit: int) -> list[str]:
        if direction == "below":
            return await below(self.store, system, code, limit)
        return await above(self.store, system, code, limit)
