"""Building response Bundles (searchset, history, batch/transaction-response) from the
stored bytes of their resources, without parsing and re-serializing those resources."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.fhir.interactions import instant, now


@dataclass(slots=True)
class Entry:
    full_url: str | None = None
    resource: bytes | None = None
    search: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        parts: list[bytes] = []
        if self.full_url is not None:
            parts.append(b'"fullUrl":' + orjson.dumps(self.full_url))
        if self.resource is not None:
            parts.append(b'"resource":' + self.resource)
        for name, value in (("search", self.search), ("request", self.request), ("response", self.response)):
            if value is not None:
                parts.append(b'"' + name.encode() + b'":' + orjson.dumps(value))
        return b"{" + b",".join(parts) + b"}"


@dataclass(slots=True)
class Bundle:
    type: str
    entries: list[Entry] = field(default_factory=list)
    total: int | None = None
    links: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        head: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": instant(now())},
            "type": self.type,
        }
        if self.total is not None:
            head["total"] = self.total
        if self.links:
            head["link"] = [{"relation": r, "url": u} for r, u in self.links]
        head.update(self.extra)
        encoded = orjson.dumps(head)
        if not self.entries:
            return encoded
        return encoded[:-1] + b',"entry":[' + b",".join(e.to_bytes() for e in self.entries) + b"]}"
