"""HTTP load from wrk: C, one thread, cycling through a list of URLs.

A Python client (httpx, aiohttp) driving 8 connections costs this 2-core machine's CPU
more than the server it measures does: on search, httpx capped both servers at about
200 requests/s and added its own queueing to every latency. wrk's cost is negligible, so
the figures are the server's. Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("WRK_PATHS")) do paths[#paths + 1] = line end
local accept = os.getenv("WRK_ACCEPT")
if accept ~= "" then wrk.headers["Accept"] = accept end
local method, body = "GET", nil
local body_file = os.getenv("WRK_BODY")
if body_file ~= "" then
  local handle = io.open(body_file, "rb")
  method, body = "POST", handle:read("*a")
  handle:close()
  wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
end
local next_path = 0
request = function()
  next_path = next_path % #paths + 1
  return wrk.format(method, paths[next_path], nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk(
    urls: list[str], headers: dict[str, str], seconds: float, connections: int = 8, body: bytes | None = None
) -> dict[str, float]:
    """Requests/s, p50/p95 latency (ms), requests, failures (no answer) and non-2xx/3xx
    answers of `connections` connections cycling through `urls` (one origin) for `seconds`;
    GETs, or POSTs of `body` (with headers["Content-Type"]) when given."""
    origin = "/".join(urls[0].split("/")[:3])
    with tempfile.TemporaryDirectory() as scratch:
        paths, script, body_file = Path(scratch) / "paths", Path(scratch) / "load.lua", Path(scratch) / "body"
        paths.write_text("\n".join(url[len(origin):] for url in urls) + "\n")
        script.write_text(SCRIPT)
        if body is not None:
            body_file.write_bytes(body)
        env = {**os.environ, "WRK_PATHS": str(paths), "WRK_ACCEPT": headers.get("Accept", ""),
               "WRK_BODY": str(body_file) if body is not None else "", "WRK_CONTENT_TYPE": headers.get("Content-Type", "")}
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "-s", str(script), origin],
            capture_output=True, text=True, env=env, check=True,
        ).stdout
    requests, duration_us, p50_us, p95_us, failed, non_ok = map(int, out.split("RESULT", 1)[1].split())
    return {"per_s": requests / (duration_us / 1e6), "requests": requests, "p50_ms": p50_us / 1000,
            "p95_ms": p95_us / 1000, "failed": failed, "non_ok": non_ok}
