"""The audit trail: one record for every HTTP exchange and every DIMSE operation.

Records are JSON lines in `<data-dir>/audit.log`, written after the outcome is known so
that failures and refusals are recorded too. Each record is one `os.write` to a file
opened with O_APPEND, so processes sharing the file never interleave lines, and the
record is in the kernel before the response leaves (the logging module's handler, lock
and flush cost as much as a tenth of a read). A later step turns these into FHIR AuditEvent resources; the call sites
stay the same.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from server.security.authorization import Access, Principal

_files: dict[Path, int] = {}  # audit.log path -> descriptor, for every app in this process


def configure(data_dir: Path) -> None:
    """Send audit records to `<data_dir>/audit.log` (idempotent)."""
    path = (data_dir / "audit.log").resolve()
    if path not in _files:
        data_dir.mkdir(parents=True, exist_ok=True)
        _files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def record(
    principal: Principal | None,
    access: Access | None,
    outcome: int,
    detail: str = "",
) -> None:
    """Record one access. `outcome` is the HTTP status or the DIMSE status code."""
    line = orjson.dumps(
        {
            "time": time.time(),
            "who": principal.subject if principal else "unknown",
            "kind": principal.kind if principal else "unknown",
            "address": principal.address if principal else "",
            "interface": access.interface if access else None,
            "interaction": access.interaction if access else None,
            "type": access.resource_type if access else None,
            "outcome": outcome,
            "detail": detail,
        }
    ) + b"\n"
    for descriptor in _files.values():
        os.write(descriptor, line)
