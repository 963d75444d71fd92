"""Where the project's shared data lives (`shared/data`: the LOINC subset, the HL7
terminology ecosystem tests), for the test suite, the benchmarks and the runners.

It sits beside the repository (`../shared/data`); a clone made elsewhere (CI's fresh
clone in /tmp) finds it beside the repository it was cloned from. `KUROSHIO_SHARED_DATA`
names it explicitly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _origin() -> Path | None:
    """The local repository this one was cloned from, if any."""
    try:
        url = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.removeprefix("file://") else None
    return path.resolve() if path is not None and path.is_dir() else None


def shared_data() -> Path | None:
    """The `shared/data` folder, or None when there is none to be found."""
    explicit = os.environ.get("KUROSHIO_SHARED_DATA")
    if explicit:
        return Path(explicit)
    origin = _origin()
    for start in (ROOT, *([origin] if origin else [])):
        for parent in (start, *start.parents):
            if (parent / "shared" / "data").is_dir():
                return parent / "shared" / "data"
    return None
