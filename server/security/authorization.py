"""Who is calling, and may they do this?

Every HTTP route depends on `authorize` and every DIMSE handler calls `decide`, with an
`Access` that names the interface, the interaction and the resource it touches. The
policy today admits everyone (the server binds to 127.0.0.1 by default); SMART on FHIR
scopes and DICOM AE access control will replace `AllowAll` without touching a route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from fastapi import Request

Interface = Literal["fhir", "dicomweb", "dimse", "admin"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: a user or app (HTTP), or a calling AE title (DIMSE)."""

    subject: str
    kind: Literal["anonymous", "user", "client", "ae"] = "anonymous"
    address: str = ""


@dataclass(frozen=True, slots=True)
class Access:
    """What the caller asks to do: e.g. ("fhir", "update", "Patient")."""

    interface: Interface
    interaction: str
    resource_type: str | None = None


class Policy(Protocol):
    def decide(self, principal: Principal, access: Access) -> bool: ...


class AllowAll:
    """Admit every request; the stand-in until authentication is configured."""

    def decide(self, principal: Principal, access: Access) -> bool:
        return True


class Forbidden(Exception):
    def __init__(self, principal: Principal, access: Access) -> None:
        super().__init__(
            f"{principal.subject} may not {access.interaction} "
            f"{access.resource_type or access.interface}"
        )
        self.principal = principal
        self.access = access


POLICY: Policy = AllowAll()


def decide(principal: Principal, access: Access) -> None:
    """Raise Forbidden unless the policy admits the access."""
    if not POLICY.decide(principal, access):
        raise Forbidden(principal, access)


def http_principal(request: Request) -> Principal:
    address = request.client.host if request.client else ""
    return Principal(subject="anonymous", kind="anonymous", address=address)


def authorize(interface: Interface, interaction: str):  # type: ignore[no-untyped-def]
    """A route dependency: identify the caller, check the access, remember both for audit."""

    async def dependency(request: Request) -> Principal:
        principal = http_principal(request)
        access = Access(interface, interaction, request.path_params.get("type"))
        request.state.principal = principal
        request.state.access = access
        decide(principal, access)
        return principal

    return dependency
