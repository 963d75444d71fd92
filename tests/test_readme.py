"""The README's curl examples work as written against a live server."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def curl_lines() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]


def test_readme_has_curl_examples():
    assert len(curl_lines()) >= 8


def test_readme_curl_examples_work_as_written(server):
    for line in curl_lines():
        command = line.replace("http://127.0.0.1:8080", server.base_url)
        args = shlex.split(command)
        args.insert(1, "--fail-with-body")
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
        if "$validate" in line:
            assert "Patient.birthDate" in result.stdout
