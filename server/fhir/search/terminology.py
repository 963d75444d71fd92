"""The seam between search and the terminology service.

Token modifiers `:in`, `:not-in` (value set membership) and `:above`, `:below`
(subsumption) need a terminology engine. The terminology package installs one with
`install(...)` at start-up (terminology/definitions.py); until then those modifiers
answer 400 and the CapabilityStatement does not claim them.

An engine that cannot answer raises `Refused` with the OperationOutcome issue code to
report (`not-found` for an unknown value set or code system, `too-costly` beyond the
limit): the search answers 400 naming the parameter, never a 5xx or a silently empty
result.
"""

from __future__ import annotations

from typing import Protocol

from server.fhir.outcome import error


class Refused(LookupError):
    """The engine cannot answer; `code` is the OperationOutcome issue code to report."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


class Terminology(Protocol):
    async def expand(self, value_set: str, limit: int) -> list[tuple[str, str]]:
        """(system, code) of every concept in the value set `value_set` identifies (a
        literal `ValueSet/[id]` reference or a canonical URL); `Refused` beyond `limit`."""

    async def subsumption(self, system: str, code: str, direction: str, limit: int) -> list[str]:
        """Codes of `system` that `code` subsumes ("below") or that subsume it ("above"),
        the code itself included; `Refused` beyond `limit`."""


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
