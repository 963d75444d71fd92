"""The seam between search and the terminology service.

Token modifiers `:in`, `:not-in` (value set membership) and `:above`, `:below`
(subsumption) need a terminology engine. The terminology package installs one with
`install(...)` at start-up; until then those modifiers answer 400 and the
CapabilityStatement does not claim them.
"""

from __future__ import annotations

from typing import Protocol

from server.fhir.outcome import error


class Terminology(Protocol):
    async def expand(self, value_set: str) -> list[tuple[str, str]]:
        """(system, code) of every concept in the value set with this canonical URL."""

    async def subsumption(self, system: str, code: str, direction: str) -> list[str]:
        """Codes of `system` that `code` subsumes ("below") or that subsume it ("above"),
        the code itself included."""


_ENGINE: list[Terminology] = []


def install(engine: Terminology) -> None:
    _ENGINE[:] = [engine]


def available() -> bool:
    return bool(_ENGINE)


def engine(modifier: str, name: str) -> Terminology:
    if not _ENGINE:
        raise error(
            400, "not-supported",
            f"{name}: the :{modifier} modifier on tokens needs the terminology service, which is not installed",
            name,
        )
    return _ENGINE[0]
