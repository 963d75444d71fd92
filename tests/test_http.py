"""The HTTP server itself: how long it keeps an idle connection."""

from __future__ import annotations

import http.client
import time

from tests.conftest import LiveServer


def test_an_idle_connection_outlives_uvicorns_five_second_default(server: LiveServer) -> None:
    """A client reusing its connection after a pause must not race the server's close of it
    (the request would fail with no response): idle connections stay open for
    `KUROSHIO_KEEP_ALIVE_SECONDS` (75 s), not uvicorn's 5 s."""
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def metadata() -> int:
        connection.request("GET", "/fhir/metadata")
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        assert metadata() == 200
        first = connection.sock.getsockname()
        time.sleep(7)
        assert metadata() == 200
        assert connection.sock.getsockname() == first  # the same connection, not a new one
    finally:
        connection.close()
