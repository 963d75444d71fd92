"""The audit trail: one record for every HTTP exchange and every DIMSE operation.

Records are JSON lines in `<data-dir>/audit.log` (one file per process is safe: each
line is one `write`), written after the outcome is known so that failures and refusals
are recorded too. A later step turns these into FHIR AuditEvent resources; the call sites
stay the same.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson

from server.security.authorization import Access, Principal

_logger = logging.getLogger("kuroshio.audit")
_logger.propagate = False


def configure(data_dir: Path) -> None:
    """Send audit records to `<data_dir>/audit.log` (idempotent)."""
    path = (data_dir / "audit.log").resolve()
    for handler in _logger.handlers:
        if getattr(handler, "baseFilename", None) == str(path):
            return
    data_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)


def record(
    principal: Principal | None,
    access: Access | None,
    outcome: int,
    detail: str = "",
) -> None:
    """Record one access. `outcome` is the HTTP status or the DIMSE status code."""
    _logger.info(
        orjson.dumps(
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
        ).decode()
    )
