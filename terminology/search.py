"""What the search engine (server/fhir/search) calls for token modifiers that need terminology.

- `:in` / `:not-in`: `value_set_codes` gives the (system, code) pairs a value set
  contains, to compile into an index query on the token terms.
- `:below` / `:above`: `below` / `above` give a concept's descendants / ancestors (the
  concept included), from the stored is-a closure.
- `subsumes` answers one pair without listing anything.

Nothing here knows about search parameters or query syntax, and no result is cached:
each call reads the definitions current at that moment, on any server process.
"""

from __future__ import annotations

from server.store.database import Store
from server.store.terminology import ConceptCriteria, TerminologyStore
from terminology.context import Context
from terminology.expansion import DEFAULT_LIMIT, ExpandOptions, Expander
from terminology.outcomes import TxError

# the largest value set :in expands (beyond it the search is refused as too costly)
MAX_CODES = 100_000


class TerminologyUnavailable(LookupError):
    """The value set or code system is not known, or is too large to use this way."""


def _context(store: Store) -> Context:
    return Context(TerminologyStore(store))


async def value_set_codes(store: Store, value_set_url: str, limit: int = MAX_CODES) -> set[tuple[str, str]]:
    """The (system, code) pairs in the value set (for `:in` and `:not-in`)."""
    context = _context(store)
    vs = await context.resource("ValueSet", value_set_url)
    if vs is None:
        raise TerminologyUnavailable(f"the value set {value_set_url} is not known")
    try:
        collected = await Expander(context, ExpandOptions(limit=max(limit, DEFAULT_LIMIT))).compose(vs, (value_set_url,))
    except TxError as exc:
        raise TerminologyUnavailable(str(exc)) from None
    if len(collected.entries) > limit:
        raise TerminologyUnavailable(f"the value set {value_set_url} has more than {limit} codes")
    return set(collected.entries)


async def below(store: Store, system: str, code: str, limit: int = MAX_CODES) -> list[str]:
    """The code and every code it subsumes (for `:below`)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable(f"the code system {system} is not known")
    criteria = ConceptCriteria(self_or_descendant_of=code)
    if await cs.source.count(criteria, []) > limit:
        raise TerminologyUnavailable(f"{system}|{code} has more than {limit} descendants")
    return [c.code for c in await cs.source.select(criteria, [])]


async def above(store: Store, system: str, code: str) -> list[str]:
    """The code and every code that subsumes it (for `:above`)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable(f"the code system {system} is not known")
    concept = await cs.find(code)
    return [code, *(concept.ancestors if concept else [])]


async def subsumes(store: Store, system: str, ancestor: str, code: str) -> bool:
    """Whether `ancestor` subsumes `code` (or is the same concept)."""
    cs = await _context(store).code_system(system)
    if cs is None:
        raise TerminologyUnavailable(f"the code system {system} is not known")
    concept = await cs.find(code)
    return concept is not None and (concept.code == ancestor or ancestor in concept.ancestors)
